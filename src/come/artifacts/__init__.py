"""What a compression writes: the plan, the output folder and its weights, the model card, GGUF export."""
