"""CLIP towers that return their intermediates, teacher loaders and students."""
