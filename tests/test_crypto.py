"""
The key hierarchy and sealing: everything round-trips, and anything altered,
cut short or moved to another place is refused with an IntegrityError.
"""

from __future__ import annotations

import random
import unicodedata

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import crypto
from lucidlink.crypto import BLOCK_SIZE, SEALED_BLOCK_SIZE, FilespaceKeys, KdfParameters
from lucidlink.errors import (
    AuthenticationFailed,
    IntegrityError,
    InvalidArgument,
    NameTooLong,
    OutOfRange,
)
from lucidlink.protocol import messages

KEYS = FilespaceKeys(crypto.new_master_key(), crypto.new_filespace_id())
OTHER_KEYS = FilespaceKeys(crypto.new_master_key(), crypto.new_filespace_id())

inodes = st.integers(0, 2**64 - 1)
names = st.binary(min_size=1, max_size=crypto.NAME_MAX).filter(
    lambda name: b"/" not in name and b"\x00" not in name and name not in (b".", b"..")
)
chunk_lengths = st.one_of(
    st.sampled_from([0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE]),
    st.integers(0, 4 * BLOCK_SIZE + 100),
)


def tiny_kdf() -> KdfParameters:
    """Argon2id parameters cheap enough for tests."""
    return crypto.new_kdf_parameters(time_cost=1, memory_kib=8, parallelism=1)


def plaintext(length: int, seed: int = 0) -> bytes:
    """Reproducible pseudo-random bytes, so no two blocks look alike."""
    return random.Random(seed).randbytes(length)


def flip(data: bytes, position: int, mask: int = 0x01) -> bytes:
    """``data`` with the bits of ``mask`` flipped at ``position``."""
    changed = bytearray(data)
    changed[position] ^= mask
    return bytes(changed)


class KeyHierarchyTests(SynchronousTestCase):
    """Subkeys come from the master key and the filespace id, and nothing else."""

    def test_same_master_key_same_keys(self) -> None:
        """Deriving twice gives keys that open each other's seals."""
        master, filespace = crypto.new_master_key(), crypto.new_filespace_id()
        sealed = crypto.seal_chunk(FilespaceKeys(master, filespace), 1, 0, b"data")
        self.assertEqual(crypto.open_chunk(FilespaceKeys(master, filespace), 1, 0, sealed), b"data")

    def test_filespace_id_salts_the_keys(self) -> None:
        """One master key under two filespace ids gives unrelated subkeys."""
        master = crypto.new_master_key()
        first = FilespaceKeys(master, crypto.new_filespace_id())
        second = FilespaceKeys(master, crypto.new_filespace_id())
        self.assertNotEqual(crypto.seal_name(first, 1, b"a"), crypto.seal_name(second, 1, b"a"))

    def test_wrong_sizes_refused(self) -> None:
        """A master key or filespace id of the wrong size is refused."""
        self.assertRaises(InvalidArgument, FilespaceKeys, b"short", crypto.new_filespace_id())
        self.assertRaises(InvalidArgument, FilespaceKeys, crypto.new_master_key(), b"short")

    def test_repr_hides_keys(self) -> None:
        """The repr names the filespace and nothing secret."""
        self.assertEqual(repr(KEYS), f"<FilespaceKeys of filespace {KEYS.filespace_id.hex()}>")

    def test_random_values_have_their_sizes(self) -> None:
        """Master keys, filespace ids and chunk ids are fresh random bytes of fixed sizes."""
        self.assertEqual(len(crypto.new_master_key()), 32)
        self.assertEqual(len(crypto.new_filespace_id()), 16)
        self.assertEqual(len(crypto.new_chunk_id()), 16)
        self.assertNotEqual(crypto.new_chunk_id(), crypto.new_chunk_id())


class NameTests(SynchronousTestCase):
    """Names are deterministic within a directory and bound to it."""

    @given(inodes, names)
    def test_round_trip(self, parent: int, name: bytes) -> None:
        """A sealed name opens to itself."""
        sealed = crypto.seal_name(KEYS, parent, name)
        self.assertLessEqual(len(sealed), crypto.SEALED_NAME_MAX)
        self.assertEqual(crypto.open_name(KEYS, parent, sealed), name)

    @given(inodes, names)
    def test_deterministic_within_a_directory(self, parent: int, name: bytes) -> None:
        """The same name in the same directory always seals the same, so the server can look it up."""
        self.assertEqual(crypto.seal_name(KEYS, parent, name), crypto.seal_name(KEYS, parent, name))

    @given(inodes, inodes, names)
    def test_different_across_directories(self, parent: int, other: int, name: bytes) -> None:
        """The same name in two directories seals differently, and will not open in the other."""
        assume(parent != other)
        sealed = crypto.seal_name(KEYS, parent, name)
        self.assertNotEqual(sealed, crypto.seal_name(KEYS, other, name))
        self.assertRaises(IntegrityError, crypto.open_name, KEYS, other, sealed)

    @given(inodes, names, st.data())
    def test_altered_name_refused(self, parent: int, name: bytes, data: st.DataObject) -> None:
        """Any flipped bit of a sealed name is detected."""
        sealed = crypto.seal_name(KEYS, parent, name)
        position = data.draw(st.integers(0, len(sealed) - 1))
        mask = data.draw(st.integers(1, 255))
        self.assertRaises(IntegrityError, crypto.open_name, KEYS, parent, flip(sealed, position, mask))

    def test_other_filespace_refused(self) -> None:
        """A name sealed in another filespace does not open."""
        self.assertRaises(IntegrityError, crypto.open_name, KEYS, 1, crypto.seal_name(OTHER_KEYS, 1, b"a"))

    def test_impossible_lengths_refused(self) -> None:
        """Sealed names too short or too long to be one are refused before decryption."""
        self.assertRaises(IntegrityError, crypto.open_name, KEYS, 1, b"x" * 16)
        self.assertRaises(IntegrityError, crypto.open_name, KEYS, 1, b"x" * (crypto.SEALED_NAME_MAX + 1))

    def test_lengths_are_padded(self) -> None:
        """The server learns a name's length only to within 16 bytes."""
        lengths = {len(crypto.seal_name(KEYS, 1, b"n" * size)) for size in range(1, 17)}
        self.assertEqual(lengths, {32})
        self.assertEqual(len(crypto.seal_name(KEYS, 1, b"n" * 255)), crypto.SEALED_NAME_MAX)

    def test_invalid_names_refused(self) -> None:
        """Names a directory cannot hold are refused, saying what is wrong."""
        for name, words in [
            (b"", "cannot be empty"),
            (b".", "'.' is reserved"),
            (b"..", "'..' is reserved"),
            (b"a/b", "contains '/'"),
            (b"a\x00b", "contains a NUL byte"),
        ]:
            with self.assertRaises(InvalidArgument) as caught:
                crypto.seal_name(KEYS, 1, name)
            self.assertIn(words, str(caught.exception))
        with self.assertRaises(NameTooLong) as caught:
            crypto.seal_name(KEYS, 1, b"n" * 256)
        self.assertIn("256 bytes is over the 255-byte limit", str(caught.exception))

    def test_inode_out_of_range_refused(self) -> None:
        """A parent inode that does not fit in 64 bits is refused."""
        self.assertRaises(InvalidArgument, crypto.seal_name, KEYS, 2**64, b"a")
        self.assertRaises(InvalidArgument, crypto.seal_name, KEYS, -1, b"a")


class AttributeTests(SynchronousTestCase):
    """Symlink targets and extended attributes are bound to their inode (and name)."""

    @given(inodes, st.binary(min_size=1, max_size=crypto.SYMLINK_MAX).filter(lambda t: b"\x00" not in t))
    def test_symlink_round_trip(self, inode: int, target: bytes) -> None:
        """A sealed symlink target opens to itself, and not under another inode."""
        sealed = crypto.seal_symlink_target(KEYS, inode, target)
        self.assertEqual(crypto.open_symlink_target(KEYS, inode, sealed), target)
        self.assertRaises(IntegrityError, crypto.open_symlink_target, KEYS, inode ^ 1, sealed)

    @given(st.data())
    def test_symlink_tampering_detected(self, data: st.DataObject) -> None:
        """Any flipped bit or cut of a sealed target is detected."""
        sealed = crypto.seal_symlink_target(KEYS, 7, b"../target")
        position = data.draw(st.integers(0, len(sealed) - 1))
        self.assertRaises(IntegrityError, crypto.open_symlink_target, KEYS, 7, flip(sealed, position))
        self.assertRaises(IntegrityError, crypto.open_symlink_target, KEYS, 7, sealed[:position])

    def test_symlink_sealing_is_randomised(self) -> None:
        """Equal targets seal differently, so the server cannot tell them apart."""
        self.assertNotEqual(crypto.seal_symlink_target(KEYS, 7, b"t"), crypto.seal_symlink_target(KEYS, 7, b"t"))

    def test_invalid_symlink_targets_refused(self) -> None:
        """Empty, NUL-holding and over-long targets are refused."""
        self.assertRaises(InvalidArgument, crypto.seal_symlink_target, KEYS, 7, b"")
        self.assertRaises(InvalidArgument, crypto.seal_symlink_target, KEYS, 7, b"a\x00")
        self.assertRaises(NameTooLong, crypto.seal_symlink_target, KEYS, 7, b"t" * 4096)

    @given(inodes, names, st.binary(max_size=300))
    def test_xattr_round_trip(self, inode: int, name: bytes, value: bytes) -> None:
        """Attribute names are deterministic per inode, and values open with their name."""
        sealed_name = crypto.seal_xattr_name(KEYS, inode, name)
        self.assertEqual(sealed_name, crypto.seal_xattr_name(KEYS, inode, name))
        self.assertEqual(crypto.open_xattr_name(KEYS, inode, sealed_name), name)
        sealed_value = crypto.seal_xattr_value(KEYS, inode, sealed_name, value)
        self.assertEqual(crypto.open_xattr_value(KEYS, inode, sealed_name, sealed_value), value)

    def test_xattr_bound_to_inode_and_name(self) -> None:
        """A name moved to another inode, or a value moved to another name or inode, is refused."""
        user_a = crypto.seal_xattr_name(KEYS, 5, b"user.a")
        user_b = crypto.seal_xattr_name(KEYS, 5, b"user.b")
        self.assertNotEqual(user_a, crypto.seal_xattr_name(KEYS, 6, b"user.a"))
        self.assertRaises(IntegrityError, crypto.open_xattr_name, KEYS, 6, user_a)
        value = crypto.seal_xattr_value(KEYS, 5, user_a, b"secret")
        self.assertRaises(IntegrityError, crypto.open_xattr_value, KEYS, 5, user_b, value)
        self.assertRaises(IntegrityError, crypto.open_xattr_value, KEYS, 6, user_a, value)
        self.assertRaises(IntegrityError, crypto.open_xattr_value, KEYS, 5, user_a, flip(value, len(value) - 1))

    def test_xattr_names_differ_from_entry_names(self) -> None:
        """Attribute names use their own key: a sealed entry name is no sealed attribute name."""
        self.assertNotEqual(crypto.seal_xattr_name(KEYS, 5, b"a"), crypto.seal_name(KEYS, 5, b"a"))
        self.assertRaises(IntegrityError, crypto.open_xattr_name, KEYS, 5, crypto.seal_name(KEYS, 5, b"a"))

    def test_invalid_xattr_names_refused(self) -> None:
        """Empty, NUL-holding and over-long attribute names are refused."""
        self.assertRaises(InvalidArgument, crypto.seal_xattr_name, KEYS, 5, b"")
        self.assertRaises(InvalidArgument, crypto.seal_xattr_name, KEYS, 5, b"user.\x00")
        self.assertRaises(OutOfRange, crypto.seal_xattr_name, KEYS, 5, b"u" * 256)


class PassphraseTests(SynchronousTestCase):
    """Passphrases become a wrapping key and a login secret; the wrong one is refused."""

    def test_derivation_is_deterministic(self) -> None:
        """The same passphrase and parameters give the same secrets; halves differ."""
        kdf = tiny_kdf()
        secrets = crypto.derive_user_secrets("correct horse", kdf)
        self.assertEqual(secrets, crypto.derive_user_secrets("correct horse", kdf))
        self.assertEqual((len(secrets.wrapping_key), len(secrets.login_secret)), (32, 32))
        self.assertNotEqual(secrets.wrapping_key, secrets.login_secret)
        self.assertNotEqual(secrets, crypto.derive_user_secrets("correct horse", tiny_kdf()))
        self.assertNotEqual(secrets, crypto.derive_user_secrets("correct horsf", kdf))

    def test_passphrase_is_normalised(self) -> None:
        """Composed and decomposed spellings of one passphrase give the same secrets."""
        kdf = tiny_kdf()
        composed = unicodedata.normalize("NFC", "café")
        decomposed = unicodedata.normalize("NFD", "café")
        self.assertNotEqual(composed, decomposed)
        self.assertEqual(crypto.derive_user_secrets(composed, kdf), crypto.derive_user_secrets(decomposed, kdf))

    def test_empty_passphrase_refused(self) -> None:
        """An empty passphrase protects nothing."""
        self.assertRaises(InvalidArgument, crypto.derive_user_secrets, "", tiny_kdf())

    def test_wire_parameters_accepted(self) -> None:
        """The wire record of KDF parameters works as well as the crypto one."""
        kdf = tiny_kdf()
        wire = messages.KdfParameters(kdf.salt, kdf.time_cost, kdf.memory_kib, kdf.parallelism)
        self.assertEqual(crypto.derive_user_secrets("p", wire), crypto.derive_user_secrets("p", kdf))

    def test_production_defaults(self) -> None:
        """New parameters have a fresh 16-byte salt and the production costs."""
        kdf = crypto.new_kdf_parameters()
        self.assertEqual(len(kdf.salt), 16)
        self.assertEqual((kdf.time_cost, kdf.memory_kib, kdf.parallelism), (3, 65536, 1))
        self.assertNotEqual(kdf.salt, crypto.new_kdf_parameters().salt)
        crypto.check_kdf_strength(kdf)

    def test_weak_parameters_refused_by_clients(self) -> None:
        """A client refuses parameters a server could brute-force the passphrase behind."""
        with self.assertRaises(AuthenticationFailed) as caught:
            crypto.check_kdf_strength(tiny_kdf())
        self.assertIn("weaker than the minimum", str(caught.exception))
        crypto.check_kdf_strength(tiny_kdf(), minimum_time_cost=1, minimum_memory_kib=8)

    def test_unusable_parameters_refused(self) -> None:
        """Parameters Argon2id cannot run, or that would exhaust memory, are refused."""
        for salt, time_cost, memory, lanes in [
            (b"short", 1, 8, 1),
            (b"s" * 16, 0, 8, 1),
            (b"s" * 16, 1, 8, 2),
            (b"s" * 16, 1, 64 * 1024 * 1024, 1),
            (b"s" * 16, 1, 8, 0),
        ]:
            self.assertRaises(InvalidArgument, KdfParameters, salt, time_cost, memory, lanes)

    def test_wrap_round_trip(self) -> None:
        """The right passphrase unwraps the master key."""
        master, filespace = crypto.new_master_key(), crypto.new_filespace_id()
        key = crypto.derive_user_secrets("pass", tiny_kdf()).wrapping_key
        wrapped = crypto.wrap_master_key(key, master, filespace, "alice")
        self.assertEqual(len(wrapped), 61)
        self.assertNotIn(master, wrapped)
        self.assertEqual(crypto.unwrap_master_key(key, wrapped, filespace, "alice"), master)

    def test_wrong_passphrase(self) -> None:
        """The wrong passphrase is refused with a message naming the user."""
        kdf, master, filespace = tiny_kdf(), crypto.new_master_key(), crypto.new_filespace_id()
        wrapped = crypto.wrap_master_key(crypto.derive_user_secrets("right", kdf).wrapping_key, master, filespace, "alice")
        wrong = crypto.derive_user_secrets("wrong", kdf).wrapping_key
        with self.assertRaises(AuthenticationFailed) as caught:
            crypto.unwrap_master_key(wrong, wrapped, filespace, "alice")
        self.assertEqual(str(caught.exception), "wrong passphrase for user alice")

    def test_wrapped_key_bound_to_user_and_filespace(self) -> None:
        """A wrapped key handed to another user or filespace does not open."""
        master, filespace = crypto.new_master_key(), crypto.new_filespace_id()
        key = crypto.derive_user_secrets("pass", tiny_kdf()).wrapping_key
        wrapped = crypto.wrap_master_key(key, master, filespace, "alice")
        self.assertRaises(AuthenticationFailed, crypto.unwrap_master_key, key, wrapped, filespace, "bob")
        self.assertRaises(
            AuthenticationFailed, crypto.unwrap_master_key, key, wrapped, crypto.new_filespace_id(), "alice"
        )
        self.assertRaises(AuthenticationFailed, crypto.unwrap_master_key, key, flip(wrapped, 30), filespace, "alice")
        self.assertRaises(IntegrityError, crypto.unwrap_master_key, key, wrapped[:-1], filespace, "alice")

    def test_login_verifier(self) -> None:
        """The server's verifier checks the login secret without being it."""
        secrets = crypto.derive_user_secrets("pass", tiny_kdf())
        salt = b"s" * 16
        verifier = crypto.login_verifier(secrets.login_secret, salt)
        self.assertNotEqual(verifier, secrets.login_secret)
        self.assertNotEqual(verifier, crypto.login_verifier(secrets.login_secret, b"t" * 16))
        self.assertTrue(crypto.check_login(secrets.login_secret, salt, verifier))
        self.assertFalse(crypto.check_login(secrets.wrapping_key, salt, verifier))

    def test_fake_salt_is_stable_and_secret(self) -> None:
        """Unknown users get a salt that does not change, and depends on the server's secret."""
        salt = crypto.fake_kdf_salt(b"server secret", "mallory")
        self.assertEqual(len(salt), 16)
        self.assertEqual(salt, crypto.fake_kdf_salt(b"server secret", "mallory"))
        self.assertNotEqual(salt, crypto.fake_kdf_salt(b"server secret", "eve"))
        self.assertNotEqual(salt, crypto.fake_kdf_salt(b"other secret", "mallory"))
        fake = crypto.fake_kdf_parameters(b"server secret", "mallory")
        self.assertEqual((fake.salt, fake.time_cost, fake.memory_kib), (salt, 3, 65536))


class ExportTests(SynchronousTestCase):
    """The offline recovery copy reads back, and damage is refused."""

    @given(st.binary(min_size=16, max_size=16), st.binary(min_size=32, max_size=32))
    def test_round_trip(self, filespace_id: bytes, master_key: bytes) -> None:
        """What is exported imports to the same filespace id and key."""
        text = crypto.export_key(filespace_id, master_key, "demo")
        self.assertEqual(crypto.import_key(text), (filespace_id, master_key, "demo"))

    def test_forgiving_of_layout(self) -> None:
        """Lower case, dashes, extra blank lines and surrounding text do not matter."""
        filespace_id, master_key = crypto.new_filespace_id(), crypto.new_master_key()
        text = crypto.export_key(filespace_id, master_key)
        lines = text.splitlines()
        retyped = "\n".join(line.lower().replace(" ", "-") if line[:1].isalnum() and ":" not in line else line for line in lines)
        imported = crypto.import_key("mail from me\n\n  " + retyped.replace("\n\n", "\n\n\n").lower() + "\nbye\n")
        self.assertEqual(imported, (filespace_id, master_key, ""))

    @given(st.binary(min_size=16, max_size=16), st.binary(min_size=32, max_size=32), st.data())
    def test_any_typing_mistake_refused(self, filespace_id: bytes, master_key: bytes, data: st.DataObject) -> None:
        """Changing any character of the key block makes the import fail."""
        text = crypto.export_key(filespace_id, master_key)
        lines = text.splitlines()
        block = [index for index, line in enumerate(lines) if line and line[0].isalnum() and ":" not in line]
        line_number = data.draw(st.sampled_from(block))
        line = lines[line_number]
        position = data.draw(st.integers(0, len(line) - 1).filter(lambda p: line[p] != " "))
        replacement = data.draw(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567").filter(lambda c: c != line[position]))
        lines[line_number] = line[:position] + replacement + line[position + 1 :]
        with self.assertRaises(InvalidArgument) as caught:
            crypto.import_key("\n".join(lines))
        self.assertIn("damaged", str(caught.exception))

    def test_damaged_exports_refused(self) -> None:
        """Missing markers, a cut key block or a wrong filespace id line are refused."""
        filespace_id = crypto.new_filespace_id()
        text = crypto.export_key(filespace_id, crypto.new_master_key())
        self.assertRaises(InvalidArgument, crypto.import_key, text.replace("-----BEGIN", "BEGIN"))
        self.assertRaises(InvalidArgument, crypto.import_key, text.replace("-----END", "END"))
        lines = text.splitlines()
        self.assertRaises(InvalidArgument, crypto.import_key, "\n".join(lines[:-2] + lines[-1:]))
        other = text.replace(filespace_id.hex(), crypto.new_filespace_id().hex())
        with self.assertRaises(InvalidArgument) as caught:
            crypto.import_key(other)
        self.assertIn("Filespace-Id line does not match", str(caught.exception))
        self.assertRaises(InvalidArgument, crypto.import_key, text.replace("A", "1").replace("B", "1"))


class ChunkTests(SynchronousTestCase):
    """Chunks round-trip, and every kind of tampering is detected."""

    @given(chunk_lengths, inodes, st.integers(0, 2**64 - 1))
    def test_round_trip(self, length: int, inode: int, chunk_index: int) -> None:
        """A sealed chunk opens to its plaintext and has the announced size."""
        data = plaintext(length, inode)
        sealed = crypto.seal_chunk(KEYS, inode, chunk_index, data)
        self.assertEqual(len(sealed), crypto.sealed_chunk_size(length))
        self.assertEqual(crypto.open_chunk(KEYS, inode, chunk_index, sealed), data)

    def test_default_chunk_size(self) -> None:
        """A whole 4 MiB chunk round-trips; the overhead is one byte and 24 per 64 KiB block."""
        data = plaintext(crypto.DEFAULT_CHUNK_SIZE)
        sealed = crypto.seal_chunk(KEYS, 1, 0, memoryview(data))
        self.assertEqual(len(sealed) - len(data), 1 + 64 * 24)
        self.assertEqual(crypto.open_chunk(KEYS, 1, 0, bytearray(sealed)), data)

    def test_sealing_is_randomised(self) -> None:
        """Equal chunks seal differently."""
        self.assertNotEqual(crypto.seal_chunk(KEYS, 1, 0, b"same"), crypto.seal_chunk(KEYS, 1, 0, b"same"))

    def test_format(self) -> None:
        """A version byte, then per block the object's nonce prefix, ciphertext and tag."""
        sealed = crypto.seal_chunk(KEYS, 1, 0, plaintext(BLOCK_SIZE + 10))
        self.assertEqual(sealed[0], 1)
        prefix = sealed[1:9]
        self.assertEqual(sealed[1 + SEALED_BLOCK_SIZE : 9 + SEALED_BLOCK_SIZE], prefix)
        self.assertEqual(len(sealed), 1 + SEALED_BLOCK_SIZE + 8 + 10 + 16)

    def test_swapped_chunk_or_file_refused(self) -> None:
        """A chunk served as another index, another file or another filespace's is refused."""
        sealed = crypto.seal_chunk(KEYS, 10, 3, plaintext(1000))
        self.assertRaises(IntegrityError, crypto.open_chunk, KEYS, 10, 4, sealed)
        self.assertRaises(IntegrityError, crypto.open_chunk, KEYS, 11, 3, sealed)
        self.assertRaises(IntegrityError, crypto.open_chunk, OTHER_KEYS, 10, 3, sealed)

    def test_swapped_blocks_refused(self) -> None:
        """Two blocks of one object in the other order are refused."""
        sealed = crypto.seal_chunk(KEYS, 1, 0, plaintext(3 * BLOCK_SIZE))
        first = sealed[1 : 1 + SEALED_BLOCK_SIZE]
        second = sealed[1 + SEALED_BLOCK_SIZE : 1 + 2 * SEALED_BLOCK_SIZE]
        swapped = sealed[:1] + second + first + sealed[1 + 2 * SEALED_BLOCK_SIZE :]
        self.assertRaises(IntegrityError, crypto.open_chunk, KEYS, 1, 0, swapped)

    def test_block_from_another_version_refused(self) -> None:
        """A block spliced in from an older object of the same chunk is refused."""
        old = crypto.seal_chunk(KEYS, 1, 0, plaintext(2 * BLOCK_SIZE, 1))
        new = crypto.seal_chunk(KEYS, 1, 0, plaintext(2 * BLOCK_SIZE, 2))
        spliced = new[: 1 + SEALED_BLOCK_SIZE] + old[1 + SEALED_BLOCK_SIZE :]
        with self.assertRaises(IntegrityError) as caught:
            crypto.open_chunk(KEYS, 1, 0, spliced)
        self.assertIn("comes from another object", str(caught.exception))

    @settings(max_examples=200)
    @given(chunk_lengths, st.data())
    def test_truncation_refused(self, length: int, data: st.DataObject) -> None:
        """An object cut anywhere, even at a block boundary, is refused."""
        sealed = crypto.seal_chunk(KEYS, 1, 0, plaintext(length))
        cut = data.draw(st.integers(0, len(sealed) - 1))
        self.assertRaises(IntegrityError, crypto.open_chunk, KEYS, 1, 0, sealed[:cut])

    def test_truncation_at_block_boundary_refused(self) -> None:
        """Dropping whole trailing blocks leaves a last block not sealed as last."""
        sealed = crypto.seal_chunk(KEYS, 1, 0, plaintext(3 * BLOCK_SIZE))
        self.assertRaises(IntegrityError, crypto.open_chunk, KEYS, 1, 0, sealed[: 1 + 2 * SEALED_BLOCK_SIZE])

    @settings(max_examples=200)
    @given(chunk_lengths, st.data())
    def test_flipped_byte_refused(self, length: int, data: st.DataObject) -> None:
        """Any flipped bit anywhere in the object is refused."""
        sealed = crypto.seal_chunk(KEYS, 1, 0, plaintext(length))
        position = data.draw(st.integers(0, len(sealed) - 1))
        mask = data.draw(st.integers(1, 255))
        self.assertRaises(IntegrityError, crypto.open_chunk, KEYS, 1, 0, flip(sealed, position, mask))

    def test_appended_bytes_refused(self) -> None:
        """Bytes after the last block are refused."""
        sealed = crypto.seal_chunk(KEYS, 1, 0, plaintext(BLOCK_SIZE))
        for extra in (b"x", b"x" * 24, b"x" * SEALED_BLOCK_SIZE):
            self.assertRaises(IntegrityError, crypto.open_chunk, KEYS, 1, 0, sealed + extra)


class BlockSealerTests(SynchronousTestCase):
    """Sealing a chunk block by block makes the object seal_chunk makes (with its own prefix)."""

    def test_blocks_make_the_object(self) -> None:
        for length in (BLOCK_SIZE, 3 * BLOCK_SIZE, 2 * BLOCK_SIZE + 100):
            plaintext = random.Random(length).randbytes(length)
            sealer = crypto.BlockSealer(KEYS, 7, 2, length)
            parts = [crypto.CHUNK_HEADER]
            while not sealer.complete:
                start = sealer.sealed * BLOCK_SIZE
                parts += [sealer.prefix, sealer.seal_next(plaintext[start : start + sealer.block_length()])]
                self.assertEqual(sum(map(len, parts)), crypto.sealed_block_offset(sealer.sealed) + len(parts[-1]) + 8)
                sealer.advance()
            sealed = b"".join(parts)
            self.assertEqual(len(sealed), len(crypto.seal_chunk(KEYS, 7, 2, plaintext)))
            self.assertEqual(crypto.open_chunk(KEYS, 7, 2, sealed), plaintext)
            with self.assertRaises(IntegrityError):
                crypto.open_chunk(KEYS, 7, 3, sealed)
            with self.assertRaises(IntegrityError, msg="the last block says it is last"):
                crypto.open_chunk(KEYS, 7, 2, sealed[: crypto.sealed_block_offset(sealer.count - 1)])

    def test_wrong_blocks_refused(self) -> None:
        sealer = crypto.BlockSealer(KEYS, 7, 2, 2 * BLOCK_SIZE)
        with self.assertRaises(InvalidArgument):
            sealer.seal_next(bytes(BLOCK_SIZE - 1))
        sealer.advance()
        sealer.advance()
        with self.assertRaises(InvalidArgument):
            sealer.seal_next(bytes(BLOCK_SIZE))
        self.assertNotEqual(crypto.BlockSealer(KEYS, 7, 2, BLOCK_SIZE).prefix, sealer.prefix)


class RangedReadTests(SynchronousTestCase):
    """A ranged read fetches only the blocks it needs and opens to the same bytes as a slice."""

    @settings(max_examples=300)
    @given(chunk_lengths, st.data())
    def test_range_equals_slice(self, length: int, data: st.DataObject) -> None:
        """Any range, including ones past the end, equals the slice of the plaintext."""
        chunk = plaintext(length, 3)
        sealed = crypto.seal_chunk(KEYS, 9, 2, chunk)
        offset = data.draw(st.integers(0, length + 10))
        size = data.draw(st.integers(0, length + 10))
        start, fetched, first_block = crypto.sealed_range_for(offset, size, length)
        got = crypto.open_range(KEYS, 9, 2, offset, size, sealed[start : start + fetched], length)
        self.assertEqual(got, chunk[offset : offset + size])
        wanted = chunk[offset : offset + size]
        if wanted:
            blocks = (offset + len(wanted) - 1) // BLOCK_SIZE - offset // BLOCK_SIZE + 1
            self.assertLessEqual(fetched, blocks * SEALED_BLOCK_SIZE)
            self.assertEqual(first_block, offset // BLOCK_SIZE)
        else:
            self.assertEqual(fetched, 0)

    def test_open_blocks_gives_whole_blocks(self) -> None:
        """open_blocks returns the plaintext of whole blocks from the first fetched one."""
        chunk = plaintext(3 * BLOCK_SIZE + 5)
        sealed = crypto.seal_chunk(KEYS, 9, 2, chunk)
        start, fetched, first_block = crypto.sealed_range_for(BLOCK_SIZE + 7, 10, len(chunk))
        self.assertEqual(first_block, 1)
        self.assertEqual(
            crypto.open_blocks(KEYS, 9, 2, 1, sealed[start : start + fetched], len(chunk)),
            chunk[BLOCK_SIZE : 2 * BLOCK_SIZE],
        )
        self.assertEqual(crypto.open_blocks(KEYS, 9, 2, 0, sealed[1:], len(chunk)), chunk)
        self.assertRaises(InvalidArgument, crypto.open_blocks, KEYS, 9, 2, 4, b"", len(chunk))

    def test_range_of_other_chunk_refused(self) -> None:
        """Blocks fetched from another chunk, file or place in the object are refused."""
        length = 3 * BLOCK_SIZE
        sealed = crypto.seal_chunk(KEYS, 9, 2, plaintext(length))
        start, fetched, _ = crypto.sealed_range_for(BLOCK_SIZE, 10, length)
        blocks = sealed[start : start + fetched]
        self.assertRaises(IntegrityError, crypto.open_range, KEYS, 9, 3, BLOCK_SIZE, 10, blocks, length)
        self.assertRaises(IntegrityError, crypto.open_range, KEYS, 8, 2, BLOCK_SIZE, 10, blocks, length)
        self.assertRaises(IntegrityError, crypto.open_range, KEYS, 9, 2, 2 * BLOCK_SIZE, 10, blocks, length)

    @given(st.data())
    def test_tampered_range_refused(self, data: st.DataObject) -> None:
        """A flipped bit in fetched blocks, or a short answer, is refused."""
        length = 2 * BLOCK_SIZE + 100
        sealed = crypto.seal_chunk(KEYS, 9, 2, plaintext(length))
        offset = data.draw(st.integers(0, length - 1))
        start, fetched, _ = crypto.sealed_range_for(offset, 1, length)
        blocks = sealed[start : start + fetched]
        position = data.draw(st.integers(0, fetched - 1))
        cut = data.draw(st.integers(1, fetched - 1))
        self.assertRaises(IntegrityError, crypto.open_range, KEYS, 9, 2, offset, 1, flip(blocks, position), length)
        self.assertRaises(IntegrityError, crypto.open_range, KEYS, 9, 2, offset, 1, blocks[:cut], length)
        self.assertRaises(IntegrityError, crypto.open_blocks, KEYS, 9, 2, offset // BLOCK_SIZE, blocks[:cut], length)

    def test_lying_chunk_length_refused(self) -> None:
        """A chunk map that claims the chunk is shorter than it was sealed is caught."""
        length = 2 * BLOCK_SIZE + 100
        sealed = crypto.seal_chunk(KEYS, 9, 2, plaintext(length))
        for claimed in (2 * BLOCK_SIZE, 2 * BLOCK_SIZE + 50, BLOCK_SIZE):
            start, fetched, first = crypto.sealed_range_for(claimed - 1, 1, claimed)
            self.assertRaises(
                IntegrityError, crypto.open_blocks, KEYS, 9, 2, first, sealed[start : start + fetched], claimed
            )

    def test_negative_ranges_refused(self) -> None:
        """Negative offsets and lengths are refused."""
        self.assertRaises(InvalidArgument, crypto.sealed_range_for, -1, 1, 10)
        self.assertRaises(InvalidArgument, crypto.sealed_range_for, 0, -1, 10)
