"""Training entry point: `python train.py lm ...` (the language model) or `python train.py codec ...` (the codec).

Each command has its own options (`python train.py lm --help`); both work under
`torchrun --nproc_per_node=N train.py COMMAND ...`. The command's module is imported only once chosen.
"""

import importlib
import sys

COMMANDS = {
    "lm": ("musicgen_lite.training.lm", "train or fine-tune the MusicGen language model on a folder of audio"),
    "codec": ("musicgen_lite.training.codec", "train an EnCodec-style codec (written as a transformers EncodecModel)"),
    "decoder": ("musicgen_lite.training.codec_decoder", "fine-tune a codec's decoder alone (its tokens stay the same)"),
    "prior": ("musicgen_lite.training.prior", "train a melody prior: the tune a melody model plays for a caption alone"),
}
USAGE = "usage: train.py {lm,codec,decoder,prior} [options]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, "", "commands:", *(f"  {name:<7}{text}" for name, (_, text) in COMMANDS.items()),
              "", "`train.py COMMAND --help` lists the options of a command.", sep="\n",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"{USAGE}\ntrain.py: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module_name = COMMANDS[argv[0]][0]
    from musicgen_lite.quiet import silence_transformers

    silence_transformers()  # stderr carries the trainer's own lines, not transformers' loading bars
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"train.py: error: the {argv[0]} trainer ({module_name}) is not part of this installation", file=sys.stderr)
        return 2
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
