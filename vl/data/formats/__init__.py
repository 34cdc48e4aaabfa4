"""Real on-disk formats: one reader module per format (plus box geometry); they never import the generator."""
