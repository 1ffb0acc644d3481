"""scatgen: generative scattering networks.

image → scattering → whitening → code → (prior) → generator → (refinement) → image
"""

from scatgen.config import Config, load_config
from scatgen.pipeline import Pipeline, load

__version__ = "0.1.0"
__all__ = ["Config", "Pipeline", "load", "load_config", "__version__"]
