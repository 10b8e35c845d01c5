package org.alignkd.core

import java.io.File
import java.io.FileInputStream
import java.security.MessageDigest

/**
 * Why a bundle was refused. The categories are those of the Python reader (`export/bundle.py`
 * `read_manifest`, `Refusal`), so both sides can be checked on the same bundles.
 */
enum class BundleRefusal(val id: String) {
    MISSING_MANIFEST("missing_manifest"),
    BAD_JSON("bad_json"),
    WRONG_FORMAT("wrong_format"),
    UNKNOWN_VERSION("unknown_version"),
    MISSING_FIELD("missing_field"),
    PATH_OUTSIDE("path_outside"),
    MISSING_FILE("missing_file"),
    SIZE_MISMATCH("size_mismatch"),
    CHECKSUM_MISMATCH("checksum_mismatch"),
    ARTIFACT_NOT_LISTED("artifact_not_listed"),
    /** A field of the wrong JSON type (the Python reader crashes on these rather than refusing). */
    INVALID_FIELD("invalid_field")
}

class BundleException(val refusal: BundleRefusal, message: String) : Exception(message)

class FileEntry(val path: String, val sha256: String, val size: Long)

class Artifact(val format: String, val quant: String, val dir: String, val files: List<String>)

class ModelInfo(
    val hiddenSize: Int, val vocabSize: Int, val numImageTokens: Int, val imageSize: Int,
    val bosId: Int, val eosIds: List<Int>, val padId: Int, val maxSeqLen: Int
)

/** A verified `manifest.json`. [raw] is the whole parsed object. */
class Manifest(val root: File, val raw: Map<String, Any?>) {
    val files: List<FileEntry> get() = J.list(raw["files"], "files").map {
        val e = J.obj(it, "a files entry")
        FileEntry(J.str(e, "path"), J.str(e, "sha256"), J.double(e, "size").toLong())
    }

    val artifacts: List<Artifact> get() = J.list(raw["artifacts"], "artifacts").map {
        val a = J.obj(it, "an artifacts entry")
        Artifact(J.str(a, "format"), J.str(a, "quant"), J.str(a, "dir"), J.list(a["files"], "artifact files").map { f -> f as String })
    }

    val model: ModelInfo get() {
        val m = J.obj(raw["model"], "model")
        return ModelInfo(J.int(m, "hidden_size"), J.int(m, "vocab_size"), J.int(m, "num_image_tokens"),
            J.int(m, "image_size"), J.int(m, "bos_id"), J.ints(m, "eos_ids"), J.int(m, "pad_id"), J.int(m, "max_seq_len"))
    }

    /** A path named by a top-level field ("preprocessing", "template", "vocab"), or [default]. */
    fun fileOf(key: String, default: String): File =
        BundleReader.safeRelpath(root, (raw[key] as? String) ?: default)

    /** The first ExecuTorch artifact (or the one with [quant]). */
    fun pteArtifact(quant: String? = null): Artifact {
        val ptes = artifacts.filter { it.format == "pte" && (quant == null || it.quant == quant) }
        if (ptes.isEmpty()) throw BundleException(BundleRefusal.INVALID_FIELD,
            "bundle $root has no ExecuTorch (pte) artifact" + (if (quant != null) " with quant $quant" else "") +
                "; export it with --target android")
        return ptes[0]
    }

    fun pteFile(quant: String? = null): File {
        val a = pteArtifact(quant)
        val f = a.files.firstOrNull { it.endsWith(".pte") }
            ?: throw BundleException(BundleRefusal.INVALID_FIELD, "artifact ${a.dir} lists no .pte file")
        return BundleReader.safeRelpath(root, f)
    }
}

/** Reads and verifies a bundle's manifest exactly as `export.bundle.read_manifest` does, check for check. */
object BundleReader {
    const val FORMAT = "alignkd-bundle"
    const val FORMAT_VERSION = 1
    const val MANIFEST = "manifest.json"

    fun read(root: File, verify: Boolean = true): Manifest {
        val path = File(root, MANIFEST)
        if (!path.isFile) throw BundleException(BundleRefusal.MISSING_MANIFEST, "$root is not a complete bundle: $MANIFEST is missing")
        val parsed = try {
            Json.parse(path.readBytes())
        } catch (e: JsonException) {
            throw BundleException(BundleRefusal.BAD_JSON, "$path is not valid JSON: ${e.message}")
        }
        val m = parsed as? Map<*, *>
            ?: throw BundleException(BundleRefusal.WRONG_FORMAT, "$path: not an alignkd bundle (not a JSON object)")
        @Suppress("UNCHECKED_CAST")
        val manifest = m as Map<String, Any?>
        if (manifest["format"] != FORMAT) {
            throw BundleException(BundleRefusal.WRONG_FORMAT, "$path: not an alignkd bundle (format ${manifest["format"]})")
        }
        if (!isVersion(manifest["format_version"])) {
            throw BundleException(BundleRefusal.UNKNOWN_VERSION,
                "$path: unknown format_version ${manifest["format_version"]} (this reader knows $FORMAT_VERSION)")
        }
        for ((key, isList) in listOf("files" to true, "artifacts" to true, "model" to false)) {
            if (!manifest.containsKey(key)) throw BundleException(BundleRefusal.MISSING_FIELD, "$path: missing field '$key'")
            val v = manifest[key]
            if (if (isList) v !is List<*> else v !is Map<*, *>) throw BundleException(BundleRefusal.INVALID_FIELD,
                "$path: invalid field '$key': expected a ${if (isList) "list" else "object"}")
        }
        for (item in manifest["files"] as List<*>) {
            // JSON integers parse as Long: a size of 12.0 or "12" is malformed, as Python's isinstance(size, int)
            val e = item as? Map<*, *>
            if (e == null || e["path"] !is String || e["size"] !is Long || e["sha256"] !is String) {
                throw BundleException(BundleRefusal.INVALID_FIELD, "$path: invalid field 'files': malformed entry $item")
            }
        }
        for (item in manifest["artifacts"] as List<*>) {
            val a = item as? Map<*, *> ?: continue // not an object: refused where its fields are read
            // a failed gate must not read as passed ("no" is truthy in Python), nor an artifact without a verdict
            if (a["parity_passed"] !is Boolean) throw BundleException(BundleRefusal.INVALID_FIELD,
                "$path: invalid field 'artifacts': parity_passed of ${a["format"]}/${a["quant"]} must be true or false")
            if (a.containsKey("options") && a["options"] !is Map<*, *>) throw BundleException(BundleRefusal.INVALID_FIELD,
                "$path: invalid field 'artifacts': options of ${a["format"]}/${a["quant"]} must be an object")
        }
        if (verify) verifyFiles(root, manifest)
        return Manifest(root, manifest)
    }

    /** Python compares `format_version != 1`: 1 and 1.0 pass, "1" or 2 do not. */
    private fun isVersion(v: Any?): Boolean = when (v) {
        is Long -> v == FORMAT_VERSION.toLong()
        is Double -> v == FORMAT_VERSION.toDouble()
        else -> false
    }

    private fun invalid(what: String): Nothing = throw BundleException(BundleRefusal.INVALID_FIELD, "manifest: $what")

    private fun verifyFiles(root: File, m: Map<String, Any?>) {
        val listed = HashSet<String>()
        for (item in m["files"] as List<*>) { // entries type-checked by read()
            val e = item as Map<*, *>
            val rel = e["path"] as String
            val f = safeRelpath(root, rel)
            if (!f.isFile) throw BundleException(BundleRefusal.MISSING_FILE, "bundle $root: file $rel listed in the manifest is missing")
            val size = e["size"] as Long
            if (size != f.length()) throw BundleException(BundleRefusal.SIZE_MISMATCH,
                "bundle $root: $rel has size ${f.length()}, the manifest says $size")
            if (sha256(f) != e["sha256"]) throw BundleException(BundleRefusal.CHECKSUM_MISMATCH, "bundle $root: checksum mismatch for $rel")
            listed.add(rel)
        }
        val artifacts = m["artifacts"] as List<*> // type-checked by read()
        for (item in artifacts) {
            val a = item as? Map<*, *> ?: invalid("each 'artifacts' entry must be an object")
            val afiles = a["files"] as? List<*> ?: invalid("an artifact's 'files' must be a list")
            for (x in afiles) {
                val rel = x as? String ?: throw BundleException(BundleRefusal.PATH_OUTSIDE,
                    "bundle $root: manifest names a path outside the bundle: $x")
                safeRelpath(root, rel)
                if (rel !in listed) throw BundleException(BundleRefusal.ARTIFACT_NOT_LISTED,
                    "bundle $root: artifact file $rel is not in the manifest's file list")
            }
        }
    }

    /** `root/rel`, refusing empty, absolute, `..`, backslash and colon paths and anything that resolves outside root. */
    fun safeRelpath(root: File, rel: String): File {
        val outside = rel.isEmpty() || rel.startsWith("/") || rel.split('/').any { it == ".." } ||
            rel.contains('\\') || rel.contains(':')
        if (outside) throw BundleException(BundleRefusal.PATH_OUTSIDE, "bundle $root: manifest names a path outside the bundle: '$rel'")
        val full = File(root, rel).canonicalFile
        if (!full.toPath().startsWith(root.canonicalFile.toPath())) {
            throw BundleException(BundleRefusal.PATH_OUTSIDE, "bundle $root: manifest names a path outside the bundle: '$rel'")
        }
        return full
    }

    fun sha256(f: File): String {
        val md = MessageDigest.getInstance("SHA-256")
        FileInputStream(f).use { inp ->
            val buf = ByteArray(1 shl 20)
            while (true) {
                val n = inp.read(buf)
                if (n < 0) break
                md.update(buf, 0, n)
            }
        }
        return hex(md.digest())
    }

    fun hex(bytes: ByteArray): String {
        val sb = StringBuilder(bytes.size * 2)
        for (b in bytes) sb.append(String.format("%02x", b.toInt() and 0xFF))
        return sb.toString()
    }
}
