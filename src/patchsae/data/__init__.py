"""Image sources and the activation store."""
