"""Data: the embedded procedural Shapes domain (images, labels, GenEval-style captions, a
detector), its caption vocabulary, and image folders with the ADM center crop."""
from zoo.data import text
from zoo.data.imagefolder import ImageFolderDataset, center_crop_arr
from zoo.data.shapes import (BACKGROUND, CLASSES, COLORS, NUM_CLASSES, PALETTE, SHAPES,
                             ShapesDataset, box_iou, caption_for, class_caption, class_id,
                             classify, collate, detect, match_objects, relative_position, render,
                             sample_scene, shapes_loader)
from zoo.data.text import PAD, UNK, VOCAB, decode, encode, vocab_size

__all__ = ["SHAPES", "COLORS", "PALETTE", "BACKGROUND", "CLASSES", "NUM_CLASSES", "class_id",
           "class_caption", "relative_position", "caption_for", "render", "sample_scene",
           "ShapesDataset", "collate", "shapes_loader", "detect", "classify", "match_objects",
           "box_iou", "text", "PAD", "UNK", "VOCAB", "vocab_size", "encode", "decode",
           "center_crop_arr", "ImageFolderDataset"]
