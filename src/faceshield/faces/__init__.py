"""Face detection, alignment to FR templates, face masks and paste-back."""
