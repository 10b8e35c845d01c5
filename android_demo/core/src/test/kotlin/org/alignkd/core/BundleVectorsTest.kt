package org.alignkd.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertThrows
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File

/** The app refuses (or accepts) every bundle variant exactly as the Python reader does. */
class BundleVectorsTest {
    private val spec = Vectors.json("bundles.json")
    private val base = File(Vectors.dir, J.str(spec, "base"))

    /** As the app opens a bundle: the manifest ([BundleReader]), then the fields and files it reads. */
    private fun verdict(root: File): String = try {
        LoadedBundle.open(root)
        "ok"
    } catch (e: BundleException) {
        e.refusal.id
    }

    @Test
    fun everyVariantGetsThePythonVerdict() {
        val variants = J.list(spec["variants"], "variants")
        assertTrue("expected many variants", variants.size >= 20)
        val tmp = Vectors.tempDir("bundles")
        val mismatches = ArrayList<String>()
        try {
            for (v in variants) {
                val m = J.obj(v, "variant")
                val root = File(tmp, J.str(m, "name"))
                Vectors.copyTree(base, root)
                Vectors.applyOps(root, J.list(m["ops"], "ops"))
                val got = verdict(root)
                if (got != J.str(m, "verdict")) mismatches.add("${m["name"]}: python ${m["verdict"]}, kotlin $got")
            }
        } finally {
            tmp.deleteRecursively()
        }
        assertEquals("verdicts differ:\n" + mismatches.joinToString("\n"), 0, mismatches.size)
        println("bundles: ${variants.size} variants, all verdicts equal to Python's")
    }

    @Test
    fun baseBundleOpensWithItsConfigs() {
        val b = LoadedBundle.open(base)
        assertEquals(48, b.preprocessing.imageSize)
        assertEquals(listOf(122, 116, 104), b.preprocessing.background.toList())
        assertEquals(144, b.model.numImageTokens)
        assertEquals(listOf(2), b.model.eosIds)
        assertEquals(512, b.tokenizer.vocabSize)
        assertEquals("pte/fp32/model.pte", b.manifest.pteArtifact().files[0])
        assertTrue(b.manifest.pteFile().isFile)
        assertEquals("v1", b.template.name)
    }

    @Test
    fun symlinkOutOfTheBundleIsRefused() {
        val tmp = Vectors.tempDir("symlink")
        try {
            val root = File(tmp, "b")
            Vectors.copyTree(base, root)
            val outside = File(tmp, "secret.bin")
            val pte = File(root, "pte/fp32/model.pte")
            outside.writeBytes(pte.readBytes())
            pte.delete()
            java.nio.file.Files.createSymbolicLink(pte.toPath(), outside.toPath())
            assertEquals("path_outside", verdict(root))
        } finally {
            tmp.deleteRecursively()
        }
    }

    @Test
    fun nonObjectManifestIsRefusedNotCrashed() {
        val tmp = Vectors.tempDir("arr")
        try {
            File(tmp, "manifest.json").writeText("[1, 2]")
            assertEquals("wrong_format", verdict(tmp))
            File(tmp, "manifest.json").writeText("""{"format": "alignkd-bundle", "format_version": 1, "files": 3, "artifacts": [], "model": {}}""")
            assertEquals("invalid_field", verdict(tmp))
            // as Python's read_manifest(verify=False): field types are checked, only the files on disk are not
            val e = assertThrows(BundleException::class.java) { BundleReader.read(tmp, verify = false) }
            assertEquals(BundleRefusal.INVALID_FIELD, e.refusal)
            File(tmp, "manifest.json").writeText("""{"format": "alignkd-bundle", "format_version": 1, "files": [{"path": "gone.bin", "size": 1, "sha256": "x"}], "artifacts": [], "model": {}}""")
            assertEquals("missing_file", verdict(tmp))
            BundleReader.read(tmp, verify = false) // the missing file is not looked for
        } finally {
            tmp.deleteRecursively()
        }
    }
}
