"""Loading weights: architecture configs, single-file and diffusers-folder loaders, key maps."""
