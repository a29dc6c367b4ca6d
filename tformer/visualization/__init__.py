"""Looking inside models and runs: attention heatmaps, gradient flow, training curves and
t-SNE of embeddings, drawn headless with matplotlib."""
