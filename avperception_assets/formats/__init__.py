"""Label formats in and out: one module per format (`bdd`, `yolo`, `voc`, `coco`: its reader and,
where there is one, its writer), the record every reader returns (`records`), which layout a batch
uses (`layouts`), and the class names (`taxonomy`, `class_names`)."""
