"""SAE checkpoint formats, one module each, behind ``patchsae.sae.io.load`` / ``save``."""
