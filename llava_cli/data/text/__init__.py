"""data/text"""
