"""Storage: the LanceDB/Geneva tables, image bytes and their decoding, and the quarantine of rejected inputs."""
