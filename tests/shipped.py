"""The version the shipped checkpoint must report on every surface (predictions, service, page, export).

One place to change when new weights ship; the tests check it reaches each surface.
"""

SHIPPED_VERSION = "pneumoscan-v2.1"
