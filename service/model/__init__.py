"""Pure-PyTorch reference world model: FSQ tokenizer + block-causal dynamics transformer."""
