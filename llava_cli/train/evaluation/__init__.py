"""Evaluation during training beyond eval_loss."""
