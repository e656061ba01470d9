"""Label formats in and out: one module per format (BDD100K, YOLO, Pascal VOC, COCO) and the shared taxonomy."""
