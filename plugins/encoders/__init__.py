"""emofuse.plugins.encoders"""
