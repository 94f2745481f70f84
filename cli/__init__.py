"""emofuse.cli"""
