"""emofuse.plugins.datasets"""
