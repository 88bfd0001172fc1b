"""Packaging for tcplogserver: one module, no dependencies."""

import re

from setuptools import setup

with open('tcplogserver.py', encoding='utf-8') as module:
    VERSION = re.search(r"^__version__ = '([^']+)'", module.read(),
                        re.MULTILINE).group(1)

with open('README.rst', encoding='utf-8') as readme:
    LONG_DESCRIPTION = readme.read()

setup(
    name='tcplogserver',
    version=VERSION,
    description='Serve an append-only log over TCP, compatible with the '
                'Node.js tcp-log-server, that never loses an acknowledged '
                'entry',
    long_description=LONG_DESCRIPTION,
    long_description_content_type='text/x-rst',
    license='MIT',
    py_modules=['tcplogserver'],
    python_requires='>=3.9',
    entry_points={'console_scripts': ['tcp-log-server = tcplogserver:main']},
    classifiers=[
        'Development Status :: 4 - Beta',
        'Environment :: No Input/Output (Daemon)',
        'Intended Audience :: Developers',
        'Intended Audience :: System Administrators',
        'License :: OSI Approved :: MIT License',
        'Operating System :: POSIX :: Linux',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Topic :: Database :: Database Engines/Servers',
        'Topic :: System :: Logging',
    ],
)
