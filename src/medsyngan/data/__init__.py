"""The data pipeline: read (NIH / folder / phantoms) → prepare (uint8 memmap + index) → load batches → partition.

Nothing here imports from models, training or anything above; those import from here.
"""
