"""tokenskip.export"""
