"""GSM8K (Cobbe et al. 2021, arXiv 2110.14168) through tensorflow-datasets, without TensorFlow.

`tfds.data_source` reads the prepared ArrayRecord files with random access and decodes records to numpy
values (bytes for text), so neither TensorFlow nor tf.data is involved. For a local copy of GSM8K's own
JSONL files, `load_jsonl(path)` gives the same examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from grpo_jax.data.dataset import Example
from grpo_jax.data.jsonl import GSM8K_MARKER, text_after


def parse_gsm8k_record(record: Mapping[str, Any], where: str = "record") -> Example:
    """A tfds gsm8k record -> {"prompt": question, "answer": text after '#### ', "solution": full answer}.

    Text fields may be bytes (tfds data sources) or str; `where` names the record in errors.
    """
    texts = {}
    for name in ("question", "answer"):
        value = record.get(name)
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = f"byte 0x{value[e.start]:02x} at byte {e.start + 1}"
                raise ValueError(f"{where}: field {name!r} is not valid UTF-8 ({bad}); re-prepare the "
                                 "dataset.") from e
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} must be text (bytes or str), got "
                             f"{type(value).__name__}; the record is not a GSM8K record.")
        texts[name] = str(value)
    final = text_after(texts["answer"], GSM8K_MARKER)
    if final is None:
        raise ValueError(f"{where}: field 'answer' does not contain {GSM8K_MARKER!r} (value "
                         f"{texts['answer']!r:.80}); GSM8K answers end with '#### <final answer>'.")
    if not final:
        raise ValueError(f"{where}: field 'answer' has nothing after its last {GSM8K_MARKER!r} (value "
                         f"{texts['answer']!r:.80}); GSM8K answers end with '#### <final answer>'.")
    return {"prompt": texts["question"], "answer": final, "solution": texts["answer"]}


def load_gsm8k(split: str = "train", *, data_dir: str | None = None, download: bool = True) -> list[Example]:
    """GSM8K examples `{"prompt": question, "answer": "18", "solution": "... #### 18"}` via tfds.

    Args:
      split: a tfds split of `gsm8k`: "train" (7,473), "test" (1,319), "train_socratic", "test_socratic",
        or a slice such as "train[:100]". tfds stores each split shuffled, so the order differs from the
        JSONL files.
      data_dir: the tfds data directory (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
      download: prepare the dataset (fetching GSM8K from GitHub) when `data_dir` lacks it; with False a
        missing dataset is an error.

    The final answer is kept as written: a few GSM8K answers have thousands separators ("1,080"), so
    compare answers as numbers.
    """
    import tensorflow_datasets as tfds

    # tfds imports its catalogue lazily: importing the module registers the gsm8k builder, which preparing
    # (and tfds.testing.mock_data) needs; reading prepared files would work without it.
    import tensorflow_datasets.text.gsm8k  # noqa: F401

    if not download and not tfds.builder("gsm8k", data_dir=data_dir).is_prepared():
        # tfds itself would report an unsupported TFRECORD file format here, which misleads.
        raise FileNotFoundError(
            f"gsm8k is not prepared in data_dir={data_dir!r} (None: $TFDS_DATA_DIR or "
            "~/tensorflow_datasets); pass download=True, or prepare it with "
            "`tfds build gsm8k --file_format=array_record`.")
    source = tfds.data_source("gsm8k", split=split, data_dir=data_dir, download=download)
    return [parse_gsm8k_record(source[i], where=f"gsm8k[{split!r}][{i}]") for i in range(len(source))]
