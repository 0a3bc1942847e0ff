"""What only the Qwen-VL families share: settings, MRoPE positions, the ViT base and its configs."""
