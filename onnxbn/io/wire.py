"""The protocol-buffer wire format, as far as onnxbn reads and writes it by hand.

onnxbn scans a model file's framing itself (`io.load.load_structure`), so that large weights
stay in the file, and writes the framing around weights it streams (`io.save.save_model`).
The scan must accept exactly the framings protobuf's parser accepts, and refuse the rest:

- a field is a tag varint (at most 5 bytes, a value below 2**32, field number 1 or more) and
  its payload, by wire type: 0 a varint (at most 10 bytes), 1 eight bytes, 5 four bytes,
  2 a length varint (at most 5 bytes, below 2**31) and that many bytes, 3 a group of fields
  closed by a wire type 4 tag of the same number (nested at most `MAX_DEPTH` deep); a wire
  type 4 anywhere else, 6 and 7 are errors, and so is a payload that runs past its message;
- overlong varints (redundant 0x80 bytes within those limits) are accepted;
- a field may repeat; for a scalar the last one wins, which the caller applies.

Reading goes through `Source`: windows of a file read with `os.pread`, never a memory map,
so a file that shrinks while it is scanned is an error (`WireError`), not a SIGBUS, and the
time and memory a scan takes follow the number of fields it visits, not the file's size.
"""

from __future__ import annotations

import os
from typing import Iterator, NamedTuple

MAX_DEPTH = 100  # protobuf's default recursion limit, which groups count against
_WINDOW = 1 << 16


class WireError(ValueError):
    """The bytes are not a well-formed protocol-buffer message."""


class Source:
    """Bytes to scan: an in-memory buffer, or a file read in windows (`Source.of_file`)."""

    def __init__(self, data: bytes = b"", fd: int | None = None, size: int | None = None):
        self.data, self.fd = data, fd
        self.size = len(data) if fd is None else int(size or 0)
        self.start = 0

    @classmethod
    def of_file(cls, fd: int) -> "Source":
        return cls(fd=fd, size=os.fstat(fd).st_size)

    def read(self, pos: int, length: int) -> bytes:
        """`length` bytes from `pos`; a WireError when the source ends before them."""
        if self.fd is None:
            chunk = self.data[pos:pos + length]
        elif self.start <= pos and pos + length <= self.start + len(self.data):
            chunk = self.data[pos - self.start:pos - self.start + length]
        elif length > _WINDOW:
            chunk = os.pread(self.fd, length, pos)
        else:
            self.data, self.start = os.pread(self.fd, _WINDOW, pos), pos
            chunk = self.data[:length]
        if len(chunk) != length:
            raise WireError("the message ends early (truncated)")
        return bytes(chunk)


class Field(NamedTuple):
    number: int
    wire: int
    tag_at: int  # where the field's tag starts
    pos: int  # where its payload starts (a length-delimited field's bytes)
    end: int  # one past its last byte


def _varint(src: Source, pos: int, end: int, max_bytes: int) -> tuple[int, int]:
    head = src.read(pos, min(max_bytes, end - pos))
    value = 0
    for i, byte in enumerate(head):
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value, pos + i + 1
    raise WireError("a varint runs past its message or is too long")


def fields(src: Source, start: int, end: int, depth: int = 0) -> Iterator[Field]:
    """Each field of the message in `src[start:end]`, in file order."""
    pos = start
    while pos < end:
        field = _field(src, pos, end, depth)
        if field.wire == 4:
            raise WireError("an end-group tag without its group")
        yield field
        pos = field.end


def _field(src: Source, pos: int, end: int, depth: int) -> Field:
    tag_at = pos
    key, pos = _varint(src, pos, end, 5)
    number, wire = key >> 3, key & 7
    if key >= 1 << 32 or number == 0:
        raise WireError(f"invalid tag {key}")
    if wire == 0:
        _, after = _varint(src, pos, end, 10)
    elif wire == 1:
        after = pos + 8
    elif wire == 5:
        after = pos + 4
    elif wire == 2:
        length, pos = _varint(src, pos, end, 5)
        if length >= 1 << 31:
            raise WireError("a length over 2 GiB")
        after = pos + length
    elif wire == 3:
        after = _group_end(src, pos, end, number, depth + 1)
    elif wire == 4:
        after = pos
    else:
        raise WireError(f"invalid wire type {wire}")
    if after > end:
        raise WireError("a field runs past its message (truncated)")
    return Field(number, wire, tag_at, pos, after)


def _group_end(src: Source, pos: int, end: int, number: int, depth: int) -> int:
    """One past the end-group tag that closes the group of field `number` opened before `pos`."""
    if depth > MAX_DEPTH:
        raise WireError("groups nested too deep")
    while pos < end:
        field = _field(src, pos, end, depth)
        if field.wire == 4:
            if field.number != number:
                raise WireError("an end-group tag that closes another group")
            return field.end
        pos = field.end
    raise WireError("a group without its end (truncated)")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_prefix(number: int, size: int) -> bytes:
    """The tag and length of a length-delimited field `number` of `size` bytes."""
    return encode_varint(number << 3 | 2) + encode_varint(size)


def submessage(number: int, payload: bytes) -> bytes:
    return length_prefix(number, len(payload)) + payload


def unknown_fields(message) -> bytes:
    """The fields of `message` that its type does not know, encoded as they were read."""
    # the protobuf stubs pyright bundles lack this module, which the protobuf runtime ships
    from google.protobuf import unknown_fields as unknown  # pyright: ignore[reportAttributeAccessIssue]

    return _encode_unknown(unknown.UnknownFieldSet(message))


def _encode_unknown(field_set) -> bytes:
    out = bytearray()
    for field in field_set:
        number, wire_type, data = field.field_number, field.wire_type, field.data
        out += encode_varint(number << 3 | wire_type)
        if wire_type == 0:
            out += encode_varint(data & (1 << 64) - 1)
        elif wire_type == 1:
            out += data.to_bytes(8, "little")
        elif wire_type == 5:
            out += data.to_bytes(4, "little")
        elif wire_type == 2:
            out += encode_varint(len(data)) + data
        else:  # a group: its fields, then the end-group tag
            out += _encode_unknown(data) + encode_varint(number << 3 | 4)
    return bytes(out)
