"""convert: the original LLaVA layout to ours and back."""
