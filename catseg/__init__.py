"""CAT-Seg: open-vocabulary semantic segmentation by cost aggregation over CLIP."""
from .config import CatSegConfig
from .factory import create_model, list_models
from .inference import Segmenter
from .model import CatSeg
from .weights import load_weights, save_weights

__all__ = ["CatSeg", "CatSegConfig", "Segmenter", "create_model", "list_models", "load_weights", "save_weights"]
