"""train/stages"""
