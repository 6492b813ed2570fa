"""tokenskip.deploy"""
