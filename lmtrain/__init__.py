"""lmtrain: the Transformer LM, optimizer, schedule, checkpoints and the training command."""
