"""File and network I/O: ISMRMRD (MRD) raw data and images, DICOM, PACS."""
