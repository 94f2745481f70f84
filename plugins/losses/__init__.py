"""emofuse.plugins.losses"""
