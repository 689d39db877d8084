"""Training, in one place: the LM trainer (`train.py lm`) and the codec trainer (`train.py codec`).

    lm, lm_config, lm_batches, lm_model     the language model: options, batches, model and loss, the loop
    codec, codec_config, codec_losses       the codec: options, reconstruction and adversarial losses, the loop
    checkpoints, log, processes, run        shared by both: checksummed step-N.pt checkpoints and random
                                            states, log.csv + TensorBoard, devices and torchrun, exit codes

Nothing in the inference core imports this package.
"""
