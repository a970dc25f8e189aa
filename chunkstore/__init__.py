"""chunkstore"""
