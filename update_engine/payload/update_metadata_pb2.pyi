# mypy: disable-error-code="type-arg"
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeltaArchiveManifest(_message.Message):
    __slots__ = ["block_size", "new_partition_info", "noop_operations", "old_partition_info", "partition_operations", "procedures", "signatures_offset", "signatures_size"]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NEW_PARTITION_INFO_FIELD_NUMBER: _ClassVar[int]
    NOOP_OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    OLD_PARTITION_INFO_FIELD_NUMBER: _ClassVar[int]
    PARTITION_OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    PROCEDURES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_SIZE_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    new_partition_info: InstallInfo
    noop_operations: _containers.RepeatedCompositeFieldContainer[InstallOperation]
    old_partition_info: InstallInfo
    partition_operations: _containers.RepeatedCompositeFieldContainer[InstallOperation]
    procedures: _containers.RepeatedCompositeFieldContainer[InstallProcedure]
    signatures_offset: int
    signatures_size: int
    def __init__(self, partition_operations: _Optional[_Iterable[_Union[InstallOperation, _Mapping]]] = ..., noop_operations: _Optional[_Iterable[_Union[InstallOperation, _Mapping]]] = ..., block_size: _Optional[int] = ..., signatures_offset: _Optional[int] = ..., signatures_size: _Optional[int] = ..., old_partition_info: _Optional[_Union[InstallInfo, _Mapping]] = ..., new_partition_info: _Optional[_Union[InstallInfo, _Mapping]] = ..., procedures: _Optional[_Iterable[_Union[InstallProcedure, _Mapping]]] = ...) -> None: ...

class Extent(_message.Message):
    __slots__ = ["num_blocks", "start_block"]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    start_block: int
    def __init__(self, start_block: _Optional[int] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class InstallInfo(_message.Message):
    __slots__ = ["hash", "size"]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    hash: bytes
    size: int
    def __init__(self, size: _Optional[int] = ..., hash: _Optional[bytes] = ...) -> None: ...

class InstallOperation(_message.Message):
    __slots__ = ["data_length", "data_offset", "data_sha256_hash", "dst_extents", "dst_length", "src_extents", "src_length", "type"]
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = []
    BSDIFF: InstallOperation.Type
    DATA_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DATA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_SHA256_HASH_FIELD_NUMBER: _ClassVar[int]
    DST_EXTENTS_FIELD_NUMBER: _ClassVar[int]
    DST_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MOVE: InstallOperation.Type
    REPLACE: InstallOperation.Type
    REPLACE_BZ: InstallOperation.Type
    SRC_EXTENTS_FIELD_NUMBER: _ClassVar[int]
    SRC_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    data_length: int
    data_offset: int
    data_sha256_hash: bytes
    dst_extents: _containers.RepeatedCompositeFieldContainer[Extent]
    dst_length: int
    src_extents: _containers.RepeatedCompositeFieldContainer[Extent]
    src_length: int
    type: InstallOperation.Type
    def __init__(self, type: _Optional[_Union[InstallOperation.Type, str]] = ..., data_offset: _Optional[int] = ..., data_length: _Optional[int] = ..., src_length: _Optional[int] = ..., src_extents: _Optional[_Iterable[_Union[Extent, _Mapping]]] = ..., dst_extents: _Optional[_Iterable[_Union[Extent, _Mapping]]] = ..., dst_length: _Optional[int] = ..., data_sha256_hash: _Optional[bytes] = ...) -> None: ...

class InstallProcedure(_message.Message):
    __slots__ = ["new_info", "old_info", "operations", "type"]
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = []
    KERNEL: InstallProcedure.Type
    NEW_INFO_FIELD_NUMBER: _ClassVar[int]
    OLD_INFO_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    PCR_POLICY: InstallProcedure.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    new_info: InstallInfo
    old_info: InstallInfo
    operations: _containers.RepeatedCompositeFieldContainer[InstallOperation]
    type: InstallProcedure.Type
    def __init__(self, type: _Optional[_Union[InstallProcedure.Type, str]] = ..., operations: _Optional[_Iterable[_Union[InstallOperation, _Mapping]]] = ..., old_info: _Optional[_Union[InstallInfo, _Mapping]] = ..., new_info: _Optional[_Union[InstallInfo, _Mapping]] = ...) -> None: ...

class Signatures(_message.Message):
    __slots__ = ["signatures"]
    class Signature(_message.Message):
        __slots__ = ["data", "version"]
        DATA_FIELD_NUMBER: _ClassVar[int]
        VERSION_FIELD_NUMBER: _ClassVar[int]
        data: bytes
        version: int
        def __init__(self, version: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    signatures: _containers.RepeatedCompositeFieldContainer[Signatures.Signature]
    def __init__(self, signatures: _Optional[_Iterable[_Union[Signatures.Signature, _Mapping]]] = ...) -> None: ...
