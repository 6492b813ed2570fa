"""tokenskip.train"""
