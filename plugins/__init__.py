"""tokenskip.plugins"""
