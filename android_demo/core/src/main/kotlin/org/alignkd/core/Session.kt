package org.alignkd.core

import java.io.File

/**
 * A verified bundle with everything the app needs besides the model: preprocessing, prompt template and
 * tokenizer. Opening refuses the bundle as the Python reader does ([BundleReader]) and then checks that
 * the pieces agree (template BOS/stop ids vs the manifest's model block, image size vs preprocessing).
 */
class LoadedBundle(
    val root: File,
    val manifest: Manifest,
    val preprocessing: PreprocessingConfig,
    val template: PromptTemplate,
    val tokenizer: SentencePieceBpe
) {
    val model: ModelInfo get() = manifest.model
    val name: String get() = root.name

    companion object {
        fun open(root: File, verify: Boolean = true): LoadedBundle {
            val manifest = BundleReader.read(root, verify)
            fun json(key: String, default: String): Map<String, Any?> {
                val f = manifest.fileOf(key, default)
                if (!f.isFile) throw BundleException(BundleRefusal.MISSING_FILE, "bundle $root: $default is missing")
                try {
                    return J.obj(Json.parse(f.readBytes()), f.name)
                } catch (e: JsonException) {
                    throw BundleException(BundleRefusal.BAD_JSON, "bundle $root: ${f.name}: ${e.message}")
                }
            }
            try {
                val pre = PreprocessingConfig.fromJson(json("preprocessing", "preprocessing.json"))
                val tpl = PromptTemplate.fromJson(json("template", "template.json"))
                val tok = SentencePieceBpe.fromJson(json("vocab", "tokenizer/vocab.json"))
                val m = manifest.model
                val problems = ArrayList<String>()
                if (pre.imageSize != m.imageSize) problems.add("preprocessing image_size ${pre.imageSize} != model image_size ${m.imageSize}")
                if (tpl.bosId != m.bosId) problems.add("template bos_id ${tpl.bosId} != model bos_id ${m.bosId}")
                if (tok.vocabSize > m.vocabSize) problems.add("tokenizer has ${tok.vocabSize} pieces, model vocab_size ${m.vocabSize}")
                if (problems.isNotEmpty()) throw BundleException(BundleRefusal.INVALID_FIELD, "bundle $root: " + problems.joinToString("; "))
                return LoadedBundle(root, manifest, pre, tpl, tok)
            } catch (e: JsonException) {
                throw BundleException(BundleRefusal.INVALID_FIELD, "bundle $root: ${e.message}")
            } catch (e: IllegalArgumentException) {
                throw BundleException(BundleRefusal.INVALID_FIELD, "bundle $root: ${e.message}")
            }
        }
    }
}

/** What the chat screen streams: text so far (decoded from all tokens), and the finished generation. */
interface AnswerListener {
    /** [text] is the whole answer so far; return false to stop. */
    fun onText(text: String, tokens: Int): Boolean
}

/**
 * The app's one question → answer path over a bundle and a runtime (no Android types). Every image, of
 * any size, goes through the bundle's preprocessing; the tokens of the last [imageCacheSize] images are
 * kept ([ImageTokenCache]), so a follow-up question about the same image skips the encoder.
 */
class VlmSession(val bundle: LoadedBundle, val runtime: VlmRuntime, imageCacheSize: Int = ImageTokenCache.DEFAULT_CAPACITY) {
    val imageCache = ImageTokenCache(imageCacheSize)
    private val generator = Generator(runtime, bundle.model.numImageTokens, bundle.template.imageTokenIndex,
        bundle.model.maxSeqLen, imageCache = imageCache)

    class Answer(val text: String, val generation: Generation, val preprocessS: Double)

    /** Any image → (1, 3, S, S) CHW float pixels, S the bundle's image size. */
    fun pixels(image: RgbImage): FloatArray = ImagePreprocessor.preprocess(image, bundle.preprocessing)

    fun ask(
        image: RgbImage?,
        question: String,
        maxNewTokens: Int,
        sampling: SamplingConfig = SamplingConfig(),
        listener: AnswerListener? = null,
        stopAtEos: Boolean = true
    ): Answer {
        val t0 = System.nanoTime()
        val px = if (image != null) pixels(image) else null
        val preS = (System.nanoTime() - t0) * 1e-9
        val ids = bundle.template.promptIds(question, bundle.tokenizer, withImage = image != null)
        val out = ArrayList<Int>()
        val tl = if (listener == null) null else object : TokenListener {
            override fun onToken(token: Int, index: Int): Boolean {
                out.add(token)
                return listener.onText(bundle.tokenizer.decode(out.toIntArray(), complete = false), out.size)
            }
        }
        val eos = LinkedHashSet<Int>()
        if (stopAtEos) { eos.addAll(bundle.model.eosIds); eos.addAll(bundle.template.stopIds) } // false: the benchmark's fixed length
        val g = generator.generate(ids, px, bundle.preprocessing.imageSize, maxNewTokens, eos, sampling, tl)
        return Answer(bundle.tokenizer.decode(g.tokens), g, preS)
    }
}
