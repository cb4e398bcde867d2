"""What a run shows: figures, the error report, Grad-CAM, the model summary and the receptive field."""
