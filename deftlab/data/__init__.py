"""Dataset loaders (real-data directory first, hub fallback), synthetic data and calibration sampling."""

from deftlab.data.arithmetic import ARITH_TEST_SETS, load_arith_test, load_arith_train
from deftlab.data.calibration import calibration_texts, fingerprint, sample_calibration
from deftlab.data.generated import generate_arith, generated_text_corpus
from deftlab.data.math import load_math, load_math500
from deftlab.data.source import HubSource, Records, resolve_data_dir
from deftlab.data.text import load_c4_sample, load_wikitext2, load_wikitext2_test
from deftlab.data.xsum import load_xsum

__all__ = [
    "ARITH_TEST_SETS",
    "HubSource",
    "Records",
    "calibration_texts",
    "fingerprint",
    "generate_arith",
    "generated_text_corpus",
    "load_arith_test",
    "load_arith_train",
    "load_c4_sample",
    "load_math",
    "load_math500",
    "load_wikitext2",
    "load_wikitext2_test",
    "load_xsum",
    "resolve_data_dir",
    "sample_calibration",
]
