"""emofuse.plugins.fusions"""
