"""Everything of the MedSeg Slicer module that is not GUI: the REST client and the scene conversions.

``client`` needs only the Python standard library; ``scene`` needs numpy for its pure functions and imports
``slicer``/``vtk`` only inside the functions that touch Slicer nodes.
"""

from __future__ import annotations
