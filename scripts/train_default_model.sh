#!/usr/bin/env bash
# Rebuild the bundled default model (musicgen_lite/assets/default_model) from music21's corpus.
# Every step resumes where it stopped when run again. Figures and timings: docs/MODEL_CARD.md.
#
#   bash scripts/train_default_model.sh [WORK_DIR]        (default WORK_DIR: ./work)
#
# Needs the [data] extra and tinysoundfont:  pip install -e ".[data]" && pip install --no-deps tinysoundfont
# and a General MIDI SoundFont (Debian: apt-get install fluid-soundfont-gm).
set -euo pipefail
WORK=${1:-work}
CODEC_STEPS=${CODEC_STEPS:-5000}
LM_STEPS=${LM_STEPS:-3000}

# 1. Data. The codec learns from every rendering (piano audio is piano audio): the named composers,
#    the early-music collections and 101 Scottish airs, 92 h. The LM learns from the named composers
#    and the airs only, 15.7 h: what people ask for, and no 67 h of Palestrina masses in one style.
LM_COLLECTIONS="bach beach beethoven chopin corelli cpebach handel haydn johnson_j_r joplin leadSheet
liliuokalani mozart schoenberg schubert schumann_clara schumann_robert verdi weber webern"
EARLY="trecento monteverdi josquin ciconia luca lusitano palestrina"
python -m musicgen_lite.data.scores --out "$WORK/lm_data" --composers $LM_COLLECTIONS
python -m musicgen_lite.data.scores --out "$WORK/lm_data" --composers airdsAirs --max-pieces 101
python -m musicgen_lite.data.scores --out "$WORK/all_data" --composers $LM_COLLECTIONS $EARLY
python -m musicgen_lite.data.scores --out "$WORK/all_data" --composers airdsAirs --max-pieces 101

# 2. Codec: EnCodec architecture, 16 base filters, 4 x 1024 codes at 50 frames/s (2.0 kbps).
OMP_NUM_THREADS=2 python train.py codec --data "$WORK/all_data" --out "$WORK/codec" \
    --max-steps "$CODEC_STEPS" --save-every 250 --eval-every 500

# 3. LM: MusicGen-Melody-style (text and chroma prefix), small-cpu preset, T5 trained with it.
OMP_NUM_THREADS=2 python train.py lm --data "$WORK/lm_data" --out "$WORK/lm" --codec "$WORK/codec" \
    --preset small-cpu --melody --segment-seconds 10 --batch-size 8 --lr 1e-3 --warmup-steps 100 \
    --max-steps "$LM_STEPS" --save-every 250 --eval-every 500

# 4. Measure, then install as the default model.
python -m musicgen_lite.evaluate all --model "$WORK/lm" --data "$WORK/lm_data" --split test \
    --out "$WORK/report.json"
python -c "import sys, musicgen_lite; musicgen_lite.load_model(sys.argv[1]).save_pretrained(sys.argv[2])" \
    "$WORK/lm" musicgen_lite/assets/default_model
