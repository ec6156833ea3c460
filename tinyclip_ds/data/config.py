"""Configuration of the training data (sources, augmentation, loading)."""

from __future__ import annotations

from dataclasses import dataclass

from tinyclip_ds.config import Range, option


@dataclass
class DataConfig:
    images: list[str] = option([], "stage1_image sources: image folders (recursive), the images of a "
                                   ".csv/.tsv or COCO .json pairs file, webdataset shards "
                                   "(shards/{00000..00099}.tar, a .tar, a folder of .tar), Hugging Face "
                                   "datasets (save_to_disk folder, .parquet, imagefolder), or demo:digits")
    captions: list[str] = option([], "stage1_text sources: .txt (one caption a line), COCO captions .json, "
                                     "the captions of a .csv/.tsv, webdataset shards, Hugging Face "
                                     "datasets, or demo:digits")
    pairs: list[str] = option([], "stage2 sources: .csv/.tsv (image path + caption), COCO captions .json, "
                                  "webdataset shards, Hugging Face datasets, or demo:digit_pairs")
    weights: list[float] = option([], "sampling weight of each source of the stage's list (data.images, "
                                      "data.captions or data.pairs), in order: a source's share of each epoch "
                                      "is its weight over their sum (repeating or sub-sampling it); [] = each "
                                      "sample once per epoch")
    image_column: str = option("", "Hugging Face datasets: the image column (an Image feature, bytes or a "
                                   "path); '' = the first of image, jpg, png, webp, img, image_path, filepath, "
                                   "file_name, path")
    caption_column: str = option("", "Hugging Face datasets: the caption column (text, or a list of texts); "
                                     "'' = the first of text, caption, txt, title, sentence, caption_text")
    split: str = option("train", "Hugging Face datasets saved as a DatasetDict: the split read")
    max_caption_chars: int = option(2000, "longer captions are skipped (counted as long_caption): scraped "
                                          "page text, not a caption", range=Range(1))
    index_cache: str = option("", "where shard-set indexes are kept; '' = a .tinyclip_index folder beside "
                                  "the shards, or ~/.cache/tinyclip_ds/shard_index when that is not writable")
    image_root: str = option("", "folder that relative image paths in data.* pairs files (and path "
                                 "columns of Hugging Face datasets) are resolved against; '' = the file's own folder, or <root>/<split>/ for a COCO file at "
                                 "<root>/annotations/captions_<split>.json (eval.data has eval.image_root)")
    csv_image_key: str = option("filepath", "column of .csv/.tsv files holding the image path")
    csv_caption_key: str = option("title", "column of .csv/.tsv files holding the caption")
    randaugment: bool = option(True, "RandAugment without colour operations (colour operations hurt "
                                     "distillation)")
    randaugment_ops: int = option(2, "RandAugment: operations applied per image", range=Range(0))
    randaugment_magnitude: int = option(9, "RandAugment: magnitude (0-30)", range=Range(0, 30))
    num_workers: int = option(2, "data-loader worker processes per rank",
                              range=Range(0, note="0 = load in the training process"))
