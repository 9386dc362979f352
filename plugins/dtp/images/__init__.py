"""Machine and container images: what ami_bake and container_build make, and where runs find them."""
