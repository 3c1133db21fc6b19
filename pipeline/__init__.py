"""sketchgan: the production pipeline for "Sketch Your Own GAN" (GANSketching) on Ray."""

__version__ = "0.1.0"
