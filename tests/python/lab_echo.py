"""wayfinder.lab.v1 SayRequest / SayReply on the wire: string fields only,
so a few lines of protobuf encoding instead of generated code."""


def _varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode(fields):
    """{field number: str} -> bytes (wire type 2 for each)."""
    out = bytearray()
    for number, text in sorted(fields.items()):
        data = text.encode()
        out += _varint(number << 3 | 2) + _varint(len(data)) + data
    return bytes(out)


def decode(data):
    """bytes -> {field number: str}, for length-delimited fields."""
    fields, i = {}, 0
    while i < len(data):
        key, i = _read_varint(data, i)
        length, i = _read_varint(data, i)
        fields[key >> 3] = data[i : i + length].decode()
        i += length
    return fields


def _read_varint(data, i):
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
