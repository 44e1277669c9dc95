"""Face datasets: read a source (FairFace, Hugging Face parquet, a folder of images) and cache it
as a uint8 array at the training resolution."""

from .prepare import PreparedData, prepare_dataset
from .sources import resolve_source
from .loader import BatchLoader, load_batch
