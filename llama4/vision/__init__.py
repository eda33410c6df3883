"""Vision room: image preprocessing (Pillow + torch) and images in prompts.

    from llama4.vision import preprocess, load_image
    tiles = preprocess("photo.jpg")          # Tiles(pixel_values (n, 3, 336, 336) bf16, grid (rows, cols))
"""

from llama4.vision.preprocess import (MAX_NUM_CHUNKS, MAX_PIXELS, TILE_SIZE, ImageError, Tiles, load_image,
                                      preprocess)

__all__ = ["MAX_NUM_CHUNKS", "MAX_PIXELS", "TILE_SIZE", "ImageError", "Tiles", "load_image", "preprocess"]
