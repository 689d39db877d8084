#!/usr/bin/env bash
# Rebuild the bundled default model (musicgen_lite/assets/default_model) from music21's corpus:
# data, codec, LM, melody prior, v3 (a better codec, the model moved onto it), evaluation, install.
# Every step resumes where it stopped when run again.
# Figures, timings and the GPU/CPU split of the shipped model: docs/MODEL_CARD.md.
#
#   bash scripts/train_default_model.sh [WORK_DIR]        (default WORK_DIR: ./work)
#
# Needs the [data] extra, tinysoundfont and a General MIDI SoundFont:
#   pip install -e ".[data]" && pip install --no-deps tinysoundfont && apt-get install fluid-soundfont-gm
# Settings (environment variables):
#   DEVICE        cpu, cuda (default: cuda when available)     WORKERS   data processes (default: all cores)
#   VARIANTS      renderings of each excerpt (default 3)       SOUNDFONT the GM bank the piano is cut from
#   CODEC_STEPS / CODEC_MINUTES, LM_STEPS / LM_MINUTES         training length (minutes: --time-limit)
#   TEXT_STEPS    steps of the text stage (default 700)      PRIOR_STEPS  steps of the melody prior (default 4000)
#   LM_BATCH      LM segments per step (default 16; 96 on a GPU)
#   INSTALL=0     keep the result in WORK_DIR/v3 instead of installing it as the default model
#   CODEC_V3_STEPS, MOVE_STEPS  steps of v3's codec (default 15500) and of the move onto it (default 2400)
set -euo pipefail
WORK=${1:-work}
WORKERS=${WORKERS:-$(nproc)}
VARIANTS=${VARIANTS:-3}
DEVICE=${DEVICE:-$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")}
SOUNDFONT=${SOUNDFONT:-/usr/share/sounds/sf2/FluidR3_GM.sf2}
CODEC_STEPS=${CODEC_STEPS:-20000}
LM_STEPS=${LM_STEPS:-20000}
LM_BATCH=${LM_BATCH:-16}
mkdir -p "$WORK"

# 0. v1 (the model shipped before this recipe) stays reachable for comparisons, outside the package.
if [ ! -f "$WORK/v1/config.json" ] && git cat-file -e 4e4be99 2>/dev/null; then
  mkdir -p "$WORK/v1" && git archive 4e4be99 musicgen_lite/assets/default_model | tar -x -C "$WORK/v1" --strip-components=3
fi

# 1. Data. (a) The named composers and 101 Scottish airs as piano MIDI with caption sidecars (music21 is
#    needed for this step only); (b) the piano alone, cut out of the GM bank; (c) every 12 s excerpt
#    rendered VARIANTS times in other keys and tempi, each with a hummed melody track.
COLLECTIONS="bach beach beethoven chopin corelli cpebach handel haydn johnson_j_r joplin leadSheet
liliuokalani mozart schoenberg schubert schumann_clara schumann_robert verdi weber webern"
python -m musicgen_lite.data.scores --export-midi --out "$WORK/midi" --composers $COLLECTIONS --workers "$WORKERS"
python -m musicgen_lite.data.scores --export-midi --out "$WORK/midi" --composers airdsAirs --max-pieces 101
[ -f "$WORK/piano.sf2" ] || python -m musicgen_lite.data.scores.soundfont "$SOUNDFONT" "$WORK/piano.sf2"
python -m musicgen_lite.data.scores --midi "$WORK/midi/midi" --out "$WORK/data" --variants "$VARIANTS" \
    --workers "$WORKERS" --soundfont "$WORK/piano.sf2"

# 2. Codec: EnCodec architecture (centred convolutions), 16 base filters, 4 x 1024 codes at 50 frames/s (2.0 kbps).
python train.py codec --data "$WORK/data" --out "$WORK/codec" --device "$DEVICE" --batch-size 48 \
    --max-steps "$CODEC_STEPS" ${CODEC_MINUTES:+--time-limit "$CODEC_MINUTES"} --save-every 500 --eval-every 1000

# 3. LM: MusicGen-Melody-style (chroma and text prefix), medium-cpu preset (d 256 x 6 layers: fast enough on a
#    2-core CPU), T5 trained with it. 10 % of rows drop text and melody (guidance); half of the others drop the
#    melody alone (text-only rows teach key and tempo words); a kept melody is the hum track 3 times in 4.
python train.py lm --data "$WORK/data" --out "$WORK/lm" --codec "$WORK/codec" --preset medium-cpu --melody \
    --melody-track-prob 0.75 --melody-dropout 0.5 --segment-seconds 10 --batch-size "$LM_BATCH" --lr 1.2e-3 --warmup-steps 300 \
    --max-steps "$LM_STEPS" ${LM_MINUTES:+--time-limit "$LM_MINUTES"} --device "$DEVICE" --save-every 500 --eval-every 500

# 3b. Tune the codec's decoder alone (every token stays the same, so the LM stays valid) and put it in the model.
python train.py decoder --codec "$WORK/codec" --data "$WORK/data" --out "$WORK/decoder" \
    --max-steps "${DECODER_STEPS:-3000}" --mel-weight 0.5
cp "$WORK/decoder/config.json" "$WORK/decoder/model.safetensors" "$WORK/lm/codec/"
rm -f "$WORK/lm/checksums.sha256"  # the run's manifest named the old decoder; installing writes a new one

# 3c. Text stage: more LM steps with text-only rows (the melody dropped alone in half the rows), the T5 trained
#     with it. The shipped v2.1 is v2's GPU-trained LM (no melody dropout yet) after 700 such steps on a CPU.
python train.py lm --data "$WORK/data" --out "$WORK/lm_text" --model "$WORK/lm" --melody --train-text-encoder \
    --melody-track-prob 0.75 --melody-dropout 0.5 --segment-seconds 10 --batch-size 16 --lr 3e-4 --warmup-steps 50 \
    --max-steps "${TEXT_STEPS:-700}" --device "$DEVICE" --save-every 100 --eval-every 200

# 3d. Melody prior: a small model with its own text encoder that writes, from the caption alone, the line the LM
#     then plays when it is given no melody (the key, mode and tempo words reach the audio through it). Trained on
#     the hum tracks' pitch classes; WORK_DIR/prior is the text-stage model with its prior.
python train.py prior --model "$WORK/lm_text" --data "$WORK/data" --out "$WORK/prior" --max-steps "${PRIOR_STEPS:-4000}"

# 3e. v3: a codec trained longer on whole pieces with a lighter mel loss (SI-SDR and log-mel both better on unheard
#     pieces), and the v2.2 model moved onto it: its code tables start from code co-occurrence on the training
#     audio (train.py lm --model --codec), then MOVE_STEPS of fine-tuning. The codec's data: the first 137 pieces of
#     the export in path order (nearly all Bach chorales), whole, as written.
have=$(grep -c . "$WORK/codec_audio/metadata.jsonl" 2>/dev/null || true)
if [ "${have:-0}" -lt 137 ]; then
  python -m musicgen_lite.data.scores --midi "$WORK/midi/midi" --out "$WORK/codec_audio" --soundfont "$WORK/piano.sf2" \
      --max-pieces $((137 - ${have:-0})) --workers "$WORKERS"
fi
python train.py codec --data "$WORK/codec_audio" --out "$WORK/codec_v3" --device "$DEVICE" --batch-size 8 \
    --quantize-warmup 500 --mel-ramp-steps 500 --mel-weight 0.03 --max-steps "${CODEC_V3_STEPS:-15500}" --save-every 500
python train.py lm --data "$WORK/data" --out "$WORK/v3" --model "$WORK/prior" --codec "$WORK/codec_v3" --melody \
    --melody-track-prob 0.75 --melody-dropout 0.5 --segment-seconds 10 --batch-size 16 --lr 6e-4 --warmup-steps 100 \
    --max-steps "${MOVE_STEPS:-2400}" --device "$DEVICE" --save-every 100 --eval-every 500

# 4. Measure v2 and v1 on held-out works (pairs: key, tempo, unheard hums, noise; codec: SI-SDR, log-mel vs Opus).
for model in v3 prior v1; do
  [ -f "$WORK/$model/config.json" ] || continue
  python -m musicgen_lite.evaluate pairs --model "$WORK/$model" --data "$WORK/data" --split test --out "$WORK/pairs_$model.json"
  python -m musicgen_lite.evaluate codec --model "$WORK/$model" --data "$WORK/data" --split test --max-files 48 \
      --out "$WORK/codec_$model.json"
done
python -m musicgen_lite.evaluate pairs --compare "$WORK"/pairs_*.json

# 5. Install as the default model, its LM stored (and by default decoded) in fp16, sampling at guidance 14 (the
#    validation sweep in docs/MODEL_CARD.md).
if [ "${INSTALL:-1}" = 1 ]; then
  python - "$WORK/v3" musicgen_lite/assets/default_model <<'PY'
import dataclasses, sys, musicgen_lite
model = musicgen_lite.load_model(sys.argv[1])
model.generation_defaults = dataclasses.replace(model.generation_defaults, cfg_coef=14.0)
model.save_pretrained(sys.argv[2], precision="fp16")
PY
fi
