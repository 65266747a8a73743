"""Reads every row that can still be read from a damaged SQLite file, without SQLite.

SQLite's own salvage (``.recover`` of the ``sqlite3`` shell) needs the
``sqlite_dbpage`` table, which Debian 12's build leaves out ("SQL logic error"), and
SQLite itself refuses a file whose header or schema page is damaged. So this module
reads the file format directly (https://www.sqlite.org/fileformat2.html):

- the pages as the last committed transaction left them: the main file with the
  committed frames of its ``-wal`` laid over it (a damaged header: the page size is
  taken from the WAL or guessed from what the pages look like);
- the schema from page 1, the rows of each table by walking its b-tree from its root
  page, skipping a page or a cell that does not parse;
- table leaf pages no tree reaches any more (their parent page is damaged) and that
  are not free: each is given back to its table through the pointer map (flowd's
  files use ``auto_vacuum = incremental``, so every page records its parent) or, when
  that fails, by the shape of its rows;
- the rowids every index of a table still lists (with the index's first column), so
  the caller can say which rows existed and were not saved.

It only reads; writing the new database is :mod:`flowd.store.integrity`'s job.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"SQLite format 3\x00"
WAL_MAGIC = (0x377F0682, 0x377F0683)
PAGE_SIZES = (4096, 1024, 2048, 8192, 16384, 32768, 65536, 512)
TABLE_LEAF, TABLE_INTERIOR, INDEX_LEAF, INDEX_INTERIOR = 13, 5, 10, 2
PTRMAP_ROOT, PTRMAP_FREE, PTRMAP_BTREE = 1, 2, 5
MAX_DEPTH = 40


class BadPage(Exception):
    """One page (or cell) does not parse; the walk skips it."""


@dataclass(frozen=True)
class SchemaEntry:
    """One row of ``sqlite_schema``."""

    type: str
    name: str
    tbl_name: str
    rootpage: int
    sql: str | None


@dataclass
class Salvage:
    """What :func:`read_file` found."""

    path: Path
    page_size: int
    page_count: int
    header_ok: bool
    wal_frames: int
    schema: list[SchemaEntry]
    rows: dict[str, dict[int, list[Any]]] = field(default_factory=dict)
    adopted: dict[str, int] = field(default_factory=dict)         # rows from pages no tree reaches
    indexed: dict[str, dict[str, dict[int, Any]]] = field(default_factory=dict)  # table -> index -> rowid -> 1st column
    lost_and_found: list[tuple[int, int, list[Any]]] = field(default_factory=list)  # (page, rowid, values)
    bad_pages: dict[int, str] = field(default_factory=dict)

    def tables(self) -> list[SchemaEntry]:
        return [e for e in self.schema if e.type == "table" and not e.name.startswith("sqlite_")]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """SQLite's big-endian varint at ``pos``: (value, next position)."""
    value = 0
    for i in range(8):
        if pos + i >= len(buf):
            raise BadPage("varint runs past the page")
        byte = buf[pos + i]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, pos + i + 1
    if pos + 8 >= len(buf):
        raise BadPage("varint runs past the page")
    value = (value << 8) | buf[pos + 8]
    if value >= 1 << 63:
        value -= 1 << 64
    return value, pos + 9


def decode_record(payload: bytes) -> list[Any]:
    """The values of one record; raises BadPage when its header and body disagree."""
    header_size, pos = _varint(payload, 0)
    if header_size < 1 or header_size > len(payload):
        raise BadPage("record header size out of range")
    types = []
    while pos < header_size:
        serial, pos = _varint(payload, pos)
        types.append(serial)
    if pos != header_size:
        raise BadPage("record header overruns")
    values: list[Any] = []
    body = header_size
    for serial in types:
        if serial in (0, 8, 9):
            values.append(None if serial == 0 else serial - 8)
            continue
        if serial in (10, 11):
            raise BadPage("reserved serial type")
        if serial <= 6:
            size = (1, 2, 3, 4, 6, 8)[serial - 1]
            if body + size > len(payload):
                raise BadPage("record body too short")
            values.append(int.from_bytes(payload[body:body + size], "big", signed=True))
        elif serial == 7:
            if body + 8 > len(payload):
                raise BadPage("record body too short")
            values.append(struct.unpack(">d", payload[body:body + 8])[0])
            size = 8
        else:
            size = (serial - 12) // 2
            if body + size > len(payload):
                raise BadPage("record body too short")
            chunk = payload[body:body + size]
            if serial % 2:
                try:
                    values.append(chunk.decode("utf-8"))
                except UnicodeDecodeError:
                    raise BadPage("text is not UTF-8") from None
            else:
                values.append(bytes(chunk))
        body += size
    if body != len(payload):
        raise BadPage("record body length differs from its header")
    return values


class Pages:
    """The file's pages as of its last commit: the main file with the WAL's committed frames over it."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        size = os.fstat(self._file.fileno()).st_size
        self.header = self._file.read(100)
        self.header_ok = len(self.header) == 100 and self.header[:16] == MAGIC
        header_size = int.from_bytes(self.header[16:18], "big") if self.header_ok else 0
        header_size = 65536 if header_size == 1 else header_size
        self.reserved = self.header[20] if self.header_ok else 0
        wal_size, self._wal, wal_pages = _read_wal(Path(f"{path}-wal"))
        self.wal_frames = len(self._wal)
        if header_size in PAGE_SIZES:
            self.page_size = header_size
        elif wal_size in PAGE_SIZES:
            self.page_size, self.reserved = wal_size, 0
        else:
            self.page_size, self.reserved = self._guess_page_size(size), 0
        if self.wal_frames and wal_size != self.page_size:
            self._wal, self.wal_frames = {}, 0  # a WAL of another page size is not this file's
        self.usable = self.page_size - self.reserved
        self.count = wal_pages if wal_pages else max(size // self.page_size, max(self._wal, default=0))

    def close(self) -> None:
        self._file.close()

    def get(self, pgno: int) -> bytes:
        if pgno < 1 or pgno > self.count:
            raise BadPage(f"outside the file (pages 1..{self.count})")
        frame = self._wal.get(pgno)
        if frame is not None:
            return frame
        data = os.pread(self._file.fileno(), self.page_size, (pgno - 1) * self.page_size)
        if len(data) != self.page_size:
            raise BadPage("cut short at the end of the file")
        return data

    def _guess_page_size(self, size: int) -> int:
        """The page size under which most pages start like b-tree pages (a damaged header)."""
        best, best_score = 4096, -1
        for candidate in PAGE_SIZES:
            pages = min(size // candidate, 2000)
            score = 0
            for pgno in range(2, pages + 1):
                data = os.pread(self._file.fileno(), 12, (pgno - 1) * candidate)
                if len(data) == 12 and _looks_like_btree(data, candidate):
                    score += 1
            if score > best_score:
                best, best_score = candidate, score
        return best


def _looks_like_btree(head: bytes, page_size: int) -> bool:
    if head[0] not in (TABLE_LEAF, TABLE_INTERIOR, INDEX_LEAF, INDEX_INTERIOR):
        return False
    cells = int.from_bytes(head[3:5], "big")
    content = int.from_bytes(head[5:7], "big") or 65536
    return 0 < cells < page_size // 4 and 8 < content <= page_size


def _read_wal(path: Path) -> tuple[int, dict[int, bytes], int]:
    """(page size, {page: newest committed image}, database size in pages) from a WAL file."""
    try:
        data = path.read_bytes()
    except OSError:
        return 0, {}, 0
    if len(data) < 32:
        return 0, {}, 0
    magic, _version, page_size, _seq, salt1, salt2 = struct.unpack(">6I", data[:24])
    if magic not in WAL_MAGIC or page_size not in PAGE_SIZES:
        return 0, {}, 0
    order = ">" if magic & 1 else "<"
    s1, s2 = _wal_checksum(data[:24], order, 0, 0)
    if (s1, s2) != struct.unpack(">2I", data[24:32]):
        return 0, {}, 0
    committed: dict[int, bytes] = {}
    pending: dict[int, bytes] = {}
    db_pages = 0
    pos = 32
    while pos + 24 + page_size <= len(data):
        pgno, commit, f_salt1, f_salt2, c1, c2 = struct.unpack(">6I", data[pos:pos + 24])
        if (f_salt1, f_salt2) != (salt1, salt2):
            break
        s1, s2 = _wal_checksum(data[pos:pos + 8], order, s1, s2)
        page = data[pos + 24:pos + 24 + page_size]
        s1, s2 = _wal_checksum(page, order, s1, s2)
        if (s1, s2) != (c1, c2):
            break
        pending[pgno] = page
        if commit:
            committed.update(pending)
            pending = {}
            db_pages = commit
        pos += 24 + page_size
    return page_size, {p: b for p, b in committed.items() if p <= db_pages}, db_pages


def _wal_checksum(data: bytes, order: str, s1: int, s2: int) -> tuple[int, int]:
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[i + 1] + s1) & 0xFFFFFFFF
    return s1, s2


class _Reader:
    """Walks b-trees over :class:`Pages`, remembering which pages it used."""

    def __init__(self, pages: Pages, bad: dict[int, str]):
        self.pages = pages
        self.bad = bad
        self.used: set[int] = set()

    def _header(self, pgno: int) -> tuple[bytes, int, int, list[int]]:
        """(page, type, header offset, cell offsets) of a b-tree page."""
        data = self.pages.get(pgno)
        base = 100 if pgno == 1 else 0
        kind = data[base]
        if kind not in (TABLE_LEAF, TABLE_INTERIOR, INDEX_LEAF, INDEX_INTERIOR):
            raise BadPage(f"not a b-tree page (type byte {kind})")
        cells = int.from_bytes(data[base + 3:base + 5], "big")
        header = 8 if kind in (TABLE_LEAF, INDEX_LEAF) else 12
        pointers = base + header
        if pointers + 2 * cells > self.pages.usable:
            raise BadPage(f"claims {cells} cells, more than fit")
        offsets = [int.from_bytes(data[pointers + 2 * i:pointers + 2 * i + 2], "big") for i in range(cells)]
        return data, kind, base, offsets

    def payload(self, data: bytes, pos: int, size: int, table: bool) -> bytes:
        """A cell's payload, following its overflow chain."""
        usable = self.pages.usable
        most = usable - 35 if table else (usable - 12) * 64 // 255 - 23
        least = (usable - 12) * 32 // 255 - 23
        if size < 0 or size > 1 << 30:
            raise BadPage("payload size out of range")
        if size <= most:
            if pos + size > usable:
                raise BadPage("cell runs past the page")
            return data[pos:pos + size]
        local = least + (size - least) % (usable - 4)
        if local > most:
            local = least
        if pos + local + 4 > usable:
            raise BadPage("cell runs past the page")
        parts = [data[pos:pos + local]]
        remaining = size - local
        next_page = int.from_bytes(data[pos + local:pos + local + 4], "big")
        seen: set[int] = set()
        while remaining > 0:
            if next_page in seen or not next_page:
                raise BadPage("overflow chain broken")
            seen.add(next_page)
            page = self.pages.get(next_page)
            chunk = page[4:4 + min(remaining, usable - 4)]
            parts.append(chunk)
            remaining -= len(chunk)
            next_page = int.from_bytes(page[:4], "big")
        self.used.update(seen)
        return b"".join(parts)

    def table_leaf(self, pgno: int, label: str = "a page no table reaches") -> Iterator[tuple[int, list[Any]]]:
        """(rowid, values) of every cell of a table leaf page that parses."""
        data, kind, _, offsets = self._header(pgno)
        if kind != TABLE_LEAF:
            raise BadPage("not a table leaf page")
        for offset in offsets:
            try:
                size, pos = _varint(data, offset)
                rowid, pos = _varint(data, pos)
                yield rowid, decode_record(self.payload(data, pos, size, table=True))
            except BadPage as exc:
                self.bad.setdefault(pgno, f"{label}: a cell: {exc}")

    def _pages(self, root: int, label: str, stack: list[tuple[int, int]]
               ) -> Iterator[tuple[int, int, bytes, int, int, list[int]]]:
        """(page number, depth, data, kind, header base, cell offsets) of every readable page
        of the b-tree at ``root`` not used yet, depth first; the caller pushes the children
        of an interior page onto ``stack``. An unreadable page is recorded in ``bad``."""
        stack.append((root, 0))
        while stack:
            pgno, depth = stack.pop()
            if pgno in self.used or depth > MAX_DEPTH:
                continue
            try:
                data, kind, base, offsets = self._header(pgno)
            except BadPage as exc:
                self.bad[pgno] = f"{label}: {exc}"
                continue
            yield pgno, depth, data, kind, base, offsets

    def walk_table(self, root: int, label: str) -> Iterator[tuple[int, list[Any]]]:
        """Every readable row of the table whose b-tree starts at ``root``."""
        stack: list[tuple[int, int]] = []
        for pgno, depth, data, kind, base, offsets in self._pages(root, label, stack):
            self.used.add(pgno)
            if kind == TABLE_LEAF:
                yield from self.table_leaf(pgno, label)
            elif kind == TABLE_INTERIOR:
                children = [int.from_bytes(data[o:o + 4], "big") for o in offsets if o + 4 <= len(data)]
                children.append(int.from_bytes(data[base + 8:base + 12], "big"))
                stack.extend((child, depth + 1) for child in reversed(children))
            else:
                self.bad[pgno] = f"{label}: an index page inside a table"

    def walk_index(self, root: int, label: str) -> Iterator[list[Any]]:
        """Every readable entry (values, rowid last) of the index starting at ``root``."""
        stack: list[tuple[int, int]] = []
        for pgno, depth, data, kind, base, offsets in self._pages(root, label, stack):
            if kind not in (INDEX_LEAF, INDEX_INTERIOR):
                self.bad[pgno] = f"{label}: a table page inside an index"
                continue
            self.used.add(pgno)
            interior = kind == INDEX_INTERIOR
            for offset in offsets:
                try:
                    pos = offset + 4 if interior else offset
                    if interior:
                        stack.append((int.from_bytes(data[offset:offset + 4], "big"), depth + 1))
                    size, pos = _varint(data, pos)
                    yield decode_record(self.payload(data, pos, size, table=False))
                except BadPage as exc:
                    self.bad.setdefault(pgno, f"{label}: a cell: {exc}")
            if interior:
                stack.append((int.from_bytes(data[base + 8:base + 12], "big"), depth + 1))


def _freelist(pages: Pages) -> set[int]:
    """Pages on the free list (their old content must not come back)."""
    found: set[int] = set()
    if not pages.header_ok:
        return found
    trunk = int.from_bytes(pages.header[32:36], "big")
    while trunk and trunk not in found:
        try:
            data = pages.get(trunk)
        except BadPage:
            break
        found.add(trunk)
        count = min(int.from_bytes(data[4:8], "big"), (pages.usable - 8) // 4)
        found.update(int.from_bytes(data[8 + 4 * i:12 + 4 * i], "big") for i in range(count))
        trunk = int.from_bytes(data[:4], "big")
    return found


class _PointerMap:
    """The auto-vacuum pointer map: for each page, its kind and its parent page."""

    def __init__(self, pages: Pages):
        self.pages = pages
        self.per_page = pages.usable // 5
        self.present = self._detect()

    def _detect(self) -> bool:
        if self.pages.header_ok:
            return int.from_bytes(self.pages.header[52:56], "big") != 0
        try:  # a damaged header: page 2 is a pointer map when every entry has a valid kind
            data = self.pages.get(2)
        except BadPage:
            return False
        kinds = [data[5 * i] for i in range(min(self.pages.count - 2, self.per_page))]
        return bool(kinds) and all(1 <= k <= 5 for k in kinds)

    def is_map_page(self, pgno: int) -> bool:
        return self.present and pgno >= 2 and (pgno - 2) % (self.per_page + 1) == 0

    def entry(self, pgno: int) -> tuple[int, int] | None:
        if not self.present or pgno < 3 or self.is_map_page(pgno):
            return None
        map_page = pgno - (pgno - 2) % (self.per_page + 1)
        try:
            data = self.pages.get(map_page)
        except BadPage:
            return None
        offset = 5 * (pgno - map_page - 1)
        return data[offset], int.from_bytes(data[offset + 1:offset + 5], "big")

    def root_of(self, pgno: int) -> int | None:
        """The root page of the b-tree ``pgno`` belongs to, climbing parent links."""
        for _ in range(MAX_DEPTH):
            entry = self.entry(pgno)
            if entry is None:
                return None
            kind, parent = entry
            if kind == PTRMAP_ROOT:
                return pgno
            if kind != PTRMAP_BTREE or not parent:
                return None
            pgno = parent
        return None


def read_file(path: Path, fallback_schema: list[SchemaEntry] | None = None) -> Salvage:
    """Everything readable in ``path`` (and its ``-wal``); ``fallback_schema`` is used
    when page 1 (the schema) cannot be read. Raises OSError when the file cannot be opened."""
    pages = Pages(path)
    try:
        bad: dict[int, str] = {}
        reader = _Reader(pages, bad)
        ptrmap = _PointerMap(pages)
        schema = [e for _, values in reader.walk_table(1, "the schema (page 1)")
                  if (e := _schema_entry(values)) is not None]
        if not any(e.type == "table" for e in schema):
            schema = _schema_from_orphans(pages, reader, ptrmap) or schema
        if not any(e.type == "table" for e in schema) and fallback_schema is not None:
            schema = list(fallback_schema)
        found = Salvage(path, pages.page_size, pages.count, pages.header_ok, pages.wal_frames, schema, bad_pages=bad)
        roots: dict[int, str] = {}
        for entry in found.tables():
            found.rows[entry.name] = {}
            found.adopted[entry.name] = 0
            if entry.rootpage > 1:
                roots[entry.rootpage] = entry.name
                for rowid, values in reader.walk_table(entry.rootpage, f"table {entry.name}"):
                    found.rows[entry.name].setdefault(rowid, values)
        for entry in schema:
            if entry.type == "index" and entry.rootpage > 1 and entry.tbl_name in found.rows:
                listed = found.indexed.setdefault(entry.tbl_name, {}).setdefault(entry.name, {})
                for values in reader.walk_index(entry.rootpage, f"index {entry.name}"):
                    if values and isinstance(values[-1], int):
                        listed.setdefault(values[-1], values[0] if len(values) > 1 else None)
        _adopt_orphans(pages, reader, ptrmap, found, roots, table_shapes(found.tables()))
        return found
    finally:
        pages.close()


Shape = tuple[int, int | None, frozenset[int]]  # columns, INTEGER PRIMARY KEY position, NOT NULL positions


def table_shapes(tables: list[SchemaEntry]) -> dict[str, Shape]:
    """What a row of each table looks like, read from its CREATE TABLE statement."""
    import sqlite3

    shapes: dict[str, Shape] = {}
    conn = sqlite3.connect(":memory:")
    try:
        for entry in tables:
            try:
                conn.execute(entry.sql or "")
                info = conn.execute(f'PRAGMA table_info("{entry.name}")').fetchall()
            except sqlite3.Error:
                continue
            keys = [row for row in info if row[5]]
            alias = keys[0][0] if len(keys) == 1 and keys[0][2].upper() == "INTEGER" else None
            shapes[entry.name] = (len(info), alias, frozenset(row[0] for row in info if row[3] and row[0] != alias))
    finally:
        conn.close()
    return shapes


def _schema_entry(values: list[Any]) -> SchemaEntry | None:
    """A row of ``sqlite_schema``, or None when ``values`` does not look like one."""
    if (len(values) != 5 or values[0] not in ("table", "index", "view", "trigger")
            or not isinstance(values[1], str) or not isinstance(values[2], str)
            or not isinstance(values[3], int | None) or not isinstance(values[4], str | None)):
        return None
    return SchemaEntry(values[0], values[1], values[2], int(values[3] or 0), values[4])


def _schema_from_orphans(pages: Pages, reader: _Reader, ptrmap: _PointerMap) -> list[SchemaEntry]:
    """Page 1 is damaged: the schema rows on leaf pages whose parent was page 1."""
    entries: list[SchemaEntry] = []
    for pgno in range(2, pages.count + 1):
        entry = ptrmap.entry(pgno)
        if ptrmap.present and (entry is None or entry != (PTRMAP_BTREE, 1)):
            continue
        try:
            if pages.get(pgno)[0] != TABLE_LEAF:
                continue
            rows = [values for _, values in reader.table_leaf(pgno)]
        except BadPage:
            continue
        found = [e for values in rows if (e := _schema_entry(values)) is not None]
        if found and len(found) == len(rows):
            entries.extend(found)
            reader.used.add(pgno)
    return entries


def _adopt_orphans(pages: Pages, reader: _Reader, ptrmap: _PointerMap, found: Salvage, roots: dict[int, str],
                   shapes: dict[str, Shape]) -> None:
    """Rows of table leaf pages that no tree reaches: back to their table, or lost and found."""
    free = _freelist(pages)
    for pgno in range(2, pages.count + 1):
        if pgno in reader.used or pgno in free or ptrmap.is_map_page(pgno):
            continue
        entry = ptrmap.entry(pgno)
        if entry is not None and entry[0] == PTRMAP_FREE:
            continue
        try:
            data = pages.get(pgno)
        except BadPage:
            continue
        if data[0] != TABLE_LEAF:
            continue
        root = ptrmap.root_of(pgno)
        table = roots.get(root) if root is not None else None
        reader.used.add(pgno)
        for rowid, values in reader.table_leaf(pgno):
            owner = table or _table_by_shape(values, shapes)
            if owner is not None and owner in found.rows and rowid not in found.rows[owner]:
                found.rows[owner][rowid] = values
                found.adopted[owner] += 1
            elif owner is None:
                found.lost_and_found.append((pgno, rowid, values))


def _table_by_shape(values: list[Any], shapes: dict[str, Shape]) -> str | None:
    """The one table whose rows look like ``values`` (column count, NULL rowid alias, NOT NULLs)."""
    matches = [name for name, (columns, alias, required) in shapes.items()
               if len(values) == columns and (alias is None or values[alias] is None)
               and all(values[i] is not None for i in required)]
    return matches[0] if len(matches) == 1 else None
